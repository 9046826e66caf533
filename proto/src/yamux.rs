//! The 12-byte yamux frame header (hashicorp/yamux v0.1.2 `spec.md`), used by Coder to multiplex
//! one dRPC connection per stream over a single websocket.
//!
//! Why here: the header layout and constants are wire format and must match hashicorp exactly; the
//! session logic (windows, keepalives, stream state) lives in the coordinator crate. This module is a
//! pure codec: it never does I/O and never panics on any input.

/// The only protocol version.
pub const VERSION: u8 = 0;
/// Encoded header length.
pub const HEADER_LEN: usize = 12;
/// Initial (and, with Coder's config, maximum) per-stream receive window: 256 KiB.
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// GoAway reason: normal termination.
pub const GO_AWAY_NORMAL: u32 = 0;
/// GoAway reason: protocol error.
pub const GO_AWAY_PROTOCOL_ERROR: u32 = 1;
/// GoAway reason: internal error.
pub const GO_AWAY_INTERNAL_ERROR: u32 = 2;

/// Frame type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Type {
    /// Stream data; `length` = payload bytes that follow.
    Data = 0,
    /// Window update; `length` = window delta.
    WindowUpdate = 1,
    /// Ping (stream 0); `length` = opaque id.
    Ping = 2,
    /// Session termination (stream 0); `length` = reason code.
    GoAway = 3,
}

impl Type {
    /// Parses a type byte.
    pub fn from_u8(v: u8) -> Option<Type> {
        match v {
            0 => Some(Type::Data),
            1 => Some(Type::WindowUpdate),
            2 => Some(Type::Ping),
            3 => Some(Type::GoAway),
            _ => None,
        }
    }
}

/// Header flags (a bit set; unknown bits are preserved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u16);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// Opens a stream / ping request.
    pub const SYN: Flags = Flags(1);
    /// Acknowledges a stream open / ping reply.
    pub const ACK: Flags = Flags(2);
    /// Half-close.
    pub const FIN: Flags = Flags(4);
    /// Reset.
    pub const RST: Flags = Flags(8);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bits.
    pub fn bits(self) -> u16 {
        self.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Flags) {
        self.0 |= rhs.0;
    }
}

/// Header decode errors; each is a session-level protocol error (GoAway 1 in hashicorp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Version byte other than 0.
    #[error("yamux: invalid protocol version {0}")]
    BadVersion(u8),
    /// Type byte other than 0..=3.
    #[error("yamux: invalid message type {0}")]
    BadType(u8),
}

/// One 12-byte header: version(u8) type(u8) flags(u16) stream_id(u32) length(u32), big-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Protocol version (always [`VERSION`] when encoding our own frames).
    pub version: u8,
    /// Frame type.
    pub typ: Type,
    /// Flags.
    pub flags: Flags,
    /// Stream id (0 for session frames).
    pub stream_id: u32,
    /// Payload length, window delta, ping id or GoAway code depending on `typ`.
    pub length: u32,
}

impl Header {
    /// A version-0 header.
    pub fn new(typ: Type, flags: Flags, stream_id: u32, length: u32) -> Header {
        Header {
            version: VERSION,
            typ,
            flags,
            stream_id,
            length,
        }
    }

    /// Data frame header carrying `len` payload bytes.
    pub fn data(flags: Flags, stream_id: u32, len: u32) -> Header {
        Header::new(Type::Data, flags, stream_id, len)
    }

    /// Window update header.
    pub fn window_update(flags: Flags, stream_id: u32, delta: u32) -> Header {
        Header::new(Type::WindowUpdate, flags, stream_id, delta)
    }

    /// Ping header (SYN for requests, ACK for replies).
    pub fn ping(flags: Flags, opaque: u32) -> Header {
        Header::new(Type::Ping, flags, 0, opaque)
    }

    /// GoAway header with one of the `GO_AWAY_*` codes.
    pub fn go_away(code: u32) -> Header {
        Header::new(Type::GoAway, Flags::NONE, 0, code)
    }

    /// Encodes into 12 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.version;
        b[1] = self.typ as u8;
        b[2..4].copy_from_slice(&self.flags.0.to_be_bytes());
        b[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        b[8..12].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes the first 12 bytes of `buf`; `Ok(None)` if fewer are available.
    pub fn decode(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
        let Some(b) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        if b[0] != VERSION {
            return Err(HeaderError::BadVersion(b[0]));
        }
        let typ = Type::from_u8(b[1]).ok_or(HeaderError::BadType(b[1]))?;
        Ok(Some(Header {
            version: b[0],
            typ,
            flags: Flags(u16::from_be_bytes([b[2], b[3]])),
            stream_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            length: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        }))
    }
}
