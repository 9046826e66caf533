//! Typed DERP frames: decoding with Tailscale's per-type validation and exact encoding.
//!
//! Why: the server, our client and the mesh client all need one place that knows each frame's
//! layout and limits. Payloads are `bytes::Bytes` slices of the frame buffer, so decoding never
//! copies packet data. What this module must never do: panic on any input, accept a frame whose
//! layout Tailscale's Go code would reject, or emit a frame that Go could not parse.
//!
//! Validation follows the reader of each frame in Go: the server's rules (`sclient.run`) for
//! frames clients send, the client's rules (`derp.Client.recvTimeout`) for frames servers send.
//! Where Go ignores trailing bytes (ServerKey, PeerGone, PeerPresent, Pong, Restarting) we accept
//! and drop them, except ServerKey, which keeps them in `extra` so re-encoding is lossless.

use core::time::Duration;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

use super::header::{exact, range, FrameHeader, FrameType};
use super::{
    FRAME_HEADER_LEN, KEY_LEN, MAGIC, MAX_CLIENT_INFO_LEN, MAX_PACKET_SIZE, MAX_PING_LEN,
    MAX_SERVER_INFO_LEN, MIN_CLIENT_INFO_LEN, NONCE_LEN, PEER_PRESENT_LEN, PING_LEN,
    SERVER_KEY_LEN,
};
use crate::key::NodePublic;

/// Why a frame (or a frame header) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Payload shorter than the frame type's minimum.
    #[error("{typ:?} frame too short: {len} bytes, need at least {min}")]
    TooShort {
        /// Frame type.
        typ: FrameType,
        /// Payload length found.
        len: usize,
        /// Minimum payload length.
        min: usize,
    },
    /// Payload longer than the frame type's maximum.
    #[error("{typ:?} frame too long: {len} bytes, at most {max}")]
    TooLong {
        /// Frame type.
        typ: FrameType,
        /// Payload length found.
        len: usize,
        /// Maximum payload length.
        max: usize,
    },
    /// Payload length must be exactly `want`.
    #[error("{typ:?} frame has length {len}, must be {want}")]
    WrongLength {
        /// Frame type.
        typ: FrameType,
        /// Payload length found.
        len: usize,
        /// Required payload length.
        want: usize,
    },
    /// ServerKey payload did not start with the DERP magic.
    #[error("ServerKey frame has bad magic")]
    BadMagic,
    /// A specific frame type was required.
    #[error("unexpected frame type 0x{got:02x}, want 0x{want:02x}")]
    UnexpectedType {
        /// Type byte found.
        got: u8,
        /// Type byte required.
        want: u8,
    },
    /// The buffer is not exactly one frame: its header length disagrees with the buffer size.
    #[error("frame header says {header} payload bytes but buffer holds {actual}")]
    LengthMismatch {
        /// Length in the header.
        header: u32,
        /// Payload bytes actually present.
        actual: usize,
    },
    /// Fewer than 5 bytes: no complete header.
    #[error("incomplete frame header")]
    IncompleteHeader,
}

/// Why a peer is gone (`PeerGoneReasonType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerGoneReason {
    /// 0x00: the peer disconnected from the region (also implied by a 32-byte PeerGone).
    Disconnected,
    /// 0x01: the server has no record of the destination of a disco packet.
    NotHere,
    /// 0xf0: synthesized locally by a mesh watcher when its mesh connection broke; never sent.
    MeshConnBroke,
    /// Any other reason byte.
    Other(u8),
}

impl PeerGoneReason {
    /// Maps a reason byte.
    pub const fn from_u8(b: u8) -> Self {
        match b {
            0x00 => PeerGoneReason::Disconnected,
            0x01 => PeerGoneReason::NotHere,
            0xf0 => PeerGoneReason::MeshConnBroke,
            other => PeerGoneReason::Other(other),
        }
    }

    /// The reason byte.
    pub const fn as_u8(self) -> u8 {
        match self {
            PeerGoneReason::Disconnected => 0x00,
            PeerGoneReason::NotHere => 0x01,
            PeerGoneReason::MeshConnBroke => 0xf0,
            PeerGoneReason::Other(b) => b,
        }
    }
}

/// PeerPresent flags byte (`PeerPresentFlags`). Zero means "old server, field unsupported".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PeerPresentFlags(pub u8);

impl PeerPresentFlags {
    /// A regular client (set only when no other flag is).
    pub const IS_REGULAR: PeerPresentFlags = PeerPresentFlags(0x01);
    /// A mesh peer (connected with the mesh key).
    pub const IS_MESH_PEER: PeerPresentFlags = PeerPresentFlags(0x02);
    /// A prober (`ClientInfo.IsProber`).
    pub const IS_PROBER: PeerPresentFlags = PeerPresentFlags(0x04);
    /// Connected to a node other than the region's first.
    pub const NOT_IDEAL: PeerPresentFlags = PeerPresentFlags(0x08);

    /// The flags derper computes for a client: prober|mesh|not-ideal, or IS_REGULAR if none.
    pub const fn for_client(is_prober: bool, is_mesh_peer: bool, not_ideal: bool) -> Self {
        let mut f = 0u8;
        if is_prober {
            f |= Self::IS_PROBER.0;
        }
        if is_mesh_peer {
            f |= Self::IS_MESH_PEER.0;
        }
        if not_ideal {
            f |= Self::NOT_IDEAL.0;
        }
        if f == 0 {
            f = Self::IS_REGULAR.0;
        }
        PeerPresentFlags(f)
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: PeerPresentFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl core::ops::BitOr for PeerPresentFlags {
    type Output = PeerPresentFlags;
    fn bitor(self, rhs: Self) -> Self {
        PeerPresentFlags(self.0 | rhs.0)
    }
}

/// One DERP frame, typed. Byte payloads are zero-copy slices of the received buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// 0x01: the server's public key; `extra` holds any bytes after magic+key (future use).
    ServerKey {
        /// Server public key.
        key: NodePublic,
        /// Trailing bytes after the key (normally empty).
        extra: Bytes,
    },
    /// 0x02: the client's key and `nonce || tag || ciphertext` of the ClientInfo JSON.
    ClientInfo {
        /// Client public key.
        key: NodePublic,
        /// Sealed box (nonce, tag, ciphertext).
        sealed: Bytes,
    },
    /// 0x03: `nonce || tag || ciphertext` of the ServerInfo JSON.
    ServerInfo {
        /// Sealed box (nonce, tag, ciphertext).
        sealed: Bytes,
    },
    /// 0x04: a packet for `dst`.
    SendPacket {
        /// Destination key.
        dst: NodePublic,
        /// Packet bytes (≤ 64 KiB).
        packet: Bytes,
    },
    /// 0x05: a packet from `src` (protocol v2 form).
    RecvPacket {
        /// Source key.
        src: NodePublic,
        /// Packet bytes (≤ 64 KiB).
        packet: Bytes,
    },
    /// 0x06: keep-alive (any payload is ignored, as Go's client does).
    KeepAlive,
    /// 0x07: whether this server is the client's home ("preferred") server.
    NotePreferred {
        /// Non-zero byte on the wire.
        preferred: bool,
    },
    /// 0x08: `peer` is gone. A 32-byte payload decodes as `Disconnected`.
    PeerGone {
        /// The peer's key.
        peer: NodePublic,
        /// Why.
        reason: PeerGoneReason,
    },
    /// 0x09: `peer` is connected. Encoded in the full 51-byte form (key, IP, port, flags).
    PeerPresent {
        /// The peer's key.
        peer: NodePublic,
        /// The peer's remote address; `None` when absent or all-zero (`[::]:0`).
        /// IPv4 travels as v4-mapped IPv6 and is unmapped when decoding.
        addr: Option<SocketAddr>,
        /// Flags byte (zero when absent).
        flags: PeerPresentFlags,
    },
    /// 0x0a: a packet from `src` to `dst`, forwarded between mesh servers.
    ForwardPacket {
        /// Original source key.
        src: NodePublic,
        /// Destination key.
        dst: NodePublic,
        /// Packet bytes (≤ 64 KiB).
        packet: Bytes,
    },
    /// 0x10: subscribe to PeerPresent/PeerGone (mesh only).
    WatchConns,
    /// 0x11: close all connections of `peer` (mesh only).
    ClosePeer {
        /// Target key.
        peer: NodePublic,
    },
    /// 0x12: ping; decoding accepts 8..=1000 bytes and keeps the first 8.
    Ping {
        /// Bytes to echo.
        data: [u8; PING_LEN],
    },
    /// 0x13: pong; decoding accepts ≥ 8 bytes and keeps the first 8.
    Pong {
        /// Echoed bytes.
        data: [u8; PING_LEN],
    },
    /// 0x14: health problem text (UTF-8 by convention, not validated); empty = healthy.
    Health {
        /// Problem text.
        problem: Bytes,
    },
    /// 0x15: the server is restarting.
    Restarting {
        /// Milliseconds to wait before reconnecting.
        reconnect_in_ms: u32,
        /// Milliseconds to keep trying.
        try_for_ms: u32,
    },
    /// Any frame type without a typed form.
    Unknown {
        /// The type byte.
        typ: u8,
        /// The payload.
        payload: Bytes,
    },
}

fn key_at(b: &[u8], at: usize) -> NodePublic {
    let mut k = [0u8; KEY_LEN];
    if let Some(src) = b.get(at..at + KEY_LEN) {
        k.copy_from_slice(src);
    }
    NodePublic::from_bytes(k)
}

fn first8(b: &[u8]) -> [u8; PING_LEN] {
    let mut d = [0u8; PING_LEN];
    if let Some(src) = b.get(..PING_LEN) {
        d.copy_from_slice(src);
    }
    d
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(s) => u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl Frame {
    /// Decodes the payload of a frame of type `typ`, validating its layout.
    ///
    /// Length rules: ServerKey ≥ 40 with magic; ClientInfo 56..=256 KiB; ServerInfo 24..=1 MiB;
    /// Send/RecvPacket 32..=32+64 KiB; ForwardPacket 64..=64+64 KiB; NotePreferred = 1;
    /// PeerGone ≥ 32; PeerPresent ≥ 32; WatchConns = 0; ClosePeer = 32; Ping 8..=1000;
    /// Pong ≥ 8; Restarting ≥ 8; KeepAlive, Health and unknown types: any.
    pub fn decode(typ: u8, payload: Bytes) -> Result<Frame, FrameError> {
        let ft = FrameType::from_u8(typ);
        let len = payload.len();
        let p = &payload[..];
        Ok(match ft {
            FrameType::ServerKey => {
                if len < SERVER_KEY_LEN {
                    return Err(FrameError::TooShort {
                        typ: ft,
                        len,
                        min: SERVER_KEY_LEN,
                    });
                }
                if p[..MAGIC.len()] != MAGIC {
                    return Err(FrameError::BadMagic);
                }
                Frame::ServerKey {
                    key: key_at(p, MAGIC.len()),
                    extra: payload.slice(SERVER_KEY_LEN..),
                }
            }
            FrameType::ClientInfo => {
                range(ft, len, MIN_CLIENT_INFO_LEN, MAX_CLIENT_INFO_LEN)?;
                Frame::ClientInfo {
                    key: key_at(p, 0),
                    sealed: payload.slice(KEY_LEN..),
                }
            }
            FrameType::ServerInfo => {
                range(ft, len, NONCE_LEN, MAX_SERVER_INFO_LEN)?;
                Frame::ServerInfo { sealed: payload }
            }
            FrameType::SendPacket => {
                range(ft, len, KEY_LEN, KEY_LEN + MAX_PACKET_SIZE)?;
                Frame::SendPacket {
                    dst: key_at(p, 0),
                    packet: payload.slice(KEY_LEN..),
                }
            }
            FrameType::RecvPacket => {
                range(ft, len, KEY_LEN, KEY_LEN + MAX_PACKET_SIZE)?;
                Frame::RecvPacket {
                    src: key_at(p, 0),
                    packet: payload.slice(KEY_LEN..),
                }
            }
            FrameType::KeepAlive => Frame::KeepAlive,
            FrameType::NotePreferred => {
                exact(ft, len, 1)?;
                Frame::NotePreferred {
                    preferred: p[0] != 0,
                }
            }
            FrameType::PeerGone => {
                range(ft, len, KEY_LEN, usize::MAX)?;
                Frame::PeerGone {
                    peer: key_at(p, 0),
                    reason: p.get(KEY_LEN).map_or(PeerGoneReason::Disconnected, |b| {
                        PeerGoneReason::from_u8(*b)
                    }),
                }
            }
            FrameType::PeerPresent => {
                range(ft, len, KEY_LEN, usize::MAX)?;
                let addr = match p.get(KEY_LEN..KEY_LEN + 18) {
                    Some(a) => {
                        let mut ip = [0u8; 16];
                        ip.copy_from_slice(&a[..16]);
                        let ip6 = Ipv6Addr::from(ip);
                        let port = u16::from_be_bytes([a[16], a[17]]);
                        if ip6.is_unspecified() && port == 0 {
                            None
                        } else {
                            let ip = match ip6.to_ipv4_mapped() {
                                Some(v4) => IpAddr::V4(v4),
                                None => IpAddr::V6(ip6),
                            };
                            Some(SocketAddr::new(ip, port))
                        }
                    }
                    None => None,
                };
                let flags = PeerPresentFlags(p.get(KEY_LEN + 18).copied().unwrap_or(0));
                Frame::PeerPresent {
                    peer: key_at(p, 0),
                    addr,
                    flags,
                }
            }
            FrameType::ForwardPacket => {
                range(ft, len, 2 * KEY_LEN, 2 * KEY_LEN + MAX_PACKET_SIZE)?;
                Frame::ForwardPacket {
                    src: key_at(p, 0),
                    dst: key_at(p, KEY_LEN),
                    packet: payload.slice(2 * KEY_LEN..),
                }
            }
            FrameType::WatchConns => {
                exact(ft, len, 0)?;
                Frame::WatchConns
            }
            FrameType::ClosePeer => {
                exact(ft, len, KEY_LEN)?;
                Frame::ClosePeer { peer: key_at(p, 0) }
            }
            FrameType::Ping => {
                range(ft, len, PING_LEN, MAX_PING_LEN)?;
                Frame::Ping { data: first8(p) }
            }
            FrameType::Pong => {
                range(ft, len, PING_LEN, usize::MAX)?;
                Frame::Pong { data: first8(p) }
            }
            FrameType::Health => Frame::Health { problem: payload },
            FrameType::Restarting => {
                range(ft, len, 8, usize::MAX)?;
                Frame::Restarting {
                    reconnect_in_ms: be_u32(p, 0),
                    try_for_ms: be_u32(p, 4),
                }
            }
            FrameType::Unknown(t) => Frame::Unknown { typ: t, payload },
        })
    }

    /// Decodes one complete frame (header + payload) from `buf`. `buf` must hold exactly one
    /// frame; use [`FrameHeader::decode`] to find frame boundaries in a stream.
    pub fn decode_frame(buf: Bytes) -> Result<Frame, FrameError> {
        let h = FrameHeader::decode(&buf).ok_or(FrameError::IncompleteHeader)?;
        let actual = buf.len() - FRAME_HEADER_LEN;
        if h.payload_len() != actual {
            return Err(FrameError::LengthMismatch {
                header: h.len,
                actual,
            });
        }
        Frame::decode(h.typ, buf.slice(FRAME_HEADER_LEN..))
    }

    /// The frame type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::ServerKey { .. } => FrameType::ServerKey,
            Frame::ClientInfo { .. } => FrameType::ClientInfo,
            Frame::ServerInfo { .. } => FrameType::ServerInfo,
            Frame::SendPacket { .. } => FrameType::SendPacket,
            Frame::RecvPacket { .. } => FrameType::RecvPacket,
            Frame::KeepAlive => FrameType::KeepAlive,
            Frame::NotePreferred { .. } => FrameType::NotePreferred,
            Frame::PeerGone { .. } => FrameType::PeerGone,
            Frame::PeerPresent { .. } => FrameType::PeerPresent,
            Frame::ForwardPacket { .. } => FrameType::ForwardPacket,
            Frame::WatchConns => FrameType::WatchConns,
            Frame::ClosePeer { .. } => FrameType::ClosePeer,
            Frame::Ping { .. } => FrameType::Ping,
            Frame::Pong { .. } => FrameType::Pong,
            Frame::Health { .. } => FrameType::Health,
            Frame::Restarting { .. } => FrameType::Restarting,
            Frame::Unknown { typ, .. } => FrameType::from_u8(*typ),
        }
    }

    /// Length of the encoded payload (excluding the 5-byte header).
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::ServerKey { extra, .. } => SERVER_KEY_LEN + extra.len(),
            Frame::ClientInfo { sealed, .. } => KEY_LEN + sealed.len(),
            Frame::ServerInfo { sealed } => sealed.len(),
            Frame::SendPacket { packet, .. } | Frame::RecvPacket { packet, .. } => {
                KEY_LEN + packet.len()
            }
            Frame::KeepAlive | Frame::WatchConns => 0,
            Frame::NotePreferred { .. } => 1,
            Frame::PeerGone { .. } => KEY_LEN + 1,
            Frame::PeerPresent { .. } => PEER_PRESENT_LEN,
            Frame::ForwardPacket { packet, .. } => 2 * KEY_LEN + packet.len(),
            Frame::ClosePeer { .. } => KEY_LEN,
            Frame::Ping { .. } | Frame::Pong { .. } => PING_LEN,
            Frame::Health { problem } => problem.len(),
            Frame::Restarting { .. } => 8,
            Frame::Unknown { payload, .. } => payload.len(),
        }
    }

    /// Total encoded length: header + payload.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload_len()
    }

    /// The header this frame encodes with.
    pub fn header(&self) -> FrameHeader {
        FrameHeader {
            typ: self.frame_type().as_u8(),
            len: len_u32(self.payload_len()),
        }
    }

    /// Appends the encoded frame (header + payload) to `buf`. Encoding does not re-check limits
    /// (e.g. a SendPacket over 64 KiB is encoded as given); senders must respect them.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(self.encoded_len());
        self.header().put(buf);
        match self {
            Frame::ServerKey { key, extra } => {
                buf.put_slice(&MAGIC);
                buf.put_slice(key.as_bytes());
                buf.put_slice(extra);
            }
            Frame::ClientInfo { key, sealed } => {
                buf.put_slice(key.as_bytes());
                buf.put_slice(sealed);
            }
            Frame::ServerInfo { sealed } => buf.put_slice(sealed),
            Frame::SendPacket { dst: k, packet } | Frame::RecvPacket { src: k, packet } => {
                buf.put_slice(k.as_bytes());
                buf.put_slice(packet);
            }
            Frame::KeepAlive | Frame::WatchConns => {}
            Frame::NotePreferred { preferred } => buf.put_u8(u8::from(*preferred)),
            Frame::PeerGone { peer, reason } => {
                buf.put_slice(peer.as_bytes());
                buf.put_u8(reason.as_u8());
            }
            Frame::PeerPresent { peer, addr, flags } => {
                buf.put_slice(peer.as_bytes());
                let (ip, port) = match addr {
                    Some(a) => {
                        let ip6 = match a.ip() {
                            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                            IpAddr::V6(v6) => v6,
                        };
                        (ip6.octets(), a.port())
                    }
                    None => ([0u8; 16], 0),
                };
                buf.put_slice(&ip);
                buf.put_u16(port);
                buf.put_u8(flags.0);
            }
            Frame::ForwardPacket { src, dst, packet } => {
                buf.put_slice(src.as_bytes());
                buf.put_slice(dst.as_bytes());
                buf.put_slice(packet);
            }
            Frame::ClosePeer { peer } => buf.put_slice(peer.as_bytes()),
            Frame::Ping { data } | Frame::Pong { data } => buf.put_slice(data),
            Frame::Health { problem } => buf.put_slice(problem),
            Frame::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => {
                buf.put_u32(*reconnect_in_ms);
                buf.put_u32(*try_for_ms);
            }
            Frame::Unknown { payload, .. } => buf.put_slice(payload),
        }
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }

    /// A Restarting frame from durations (saturating at `u32::MAX` milliseconds).
    pub fn restarting(reconnect_in: Duration, try_for: Duration) -> Frame {
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        Frame::Restarting {
            reconnect_in_ms: ms(reconnect_in),
            try_for_ms: ms(try_for),
        }
    }
}
