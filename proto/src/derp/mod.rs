//! The DERP wire protocol (Tailscale's "Designated Encrypted Relay for Packets"), version 2.
//!
//! Why this module exists: tailnetd must be byte-compatible with Tailscale's `derp` package so that
//! unmodified Tailscale/Coder clients and Go derpers (as mesh peers) can talk to it. Everything here
//! is a pure function of its inputs: frame headers, typed frames, the handshake's NaCl-sealed JSON,
//! and allocation-free helpers for the packet hot path.
//!
//! What this module must never do: perform I/O, read a clock, generate randomness (nonces come
//! from the caller), panic on any input, or allocate in the hot-path helpers in [`fast`].
//!
//! Layout: [`header`] (5-byte frame header and frame types), [`frame`] (typed frames and their
//! validation rules), [`info`] (ClientInfo/ServerInfo JSON), [`handshake`] (sealing and opening
//! those), [`fast`] (zero-copy helpers for SendPacket/RecvPacket/ForwardPacket).

pub mod admit;
pub mod fast;
pub mod frame;
pub mod handshake;
pub mod header;
pub mod info;
pub mod quicmesh;

use core::time::Duration;

pub use crate::key::{KEY_LEN, NONCE_LEN};
pub use fast::{
    encode_recv_packet, encode_send_packet, forward_packet_keys, forward_packet_prefix,
    looks_like_disco, recv_packet_prefix, rewrite_forward_to_recv, rewrite_send_to_recv,
    send_packet_dst, send_packet_prefix, FORWARD_PREFIX_LEN, PACKET_PREFIX_LEN,
};
pub use frame::{Frame, FrameError, PeerGoneReason, PeerPresentFlags};
pub use handshake::{
    client_info_frame, expect_frame, open_client_info, open_server_info, parse_server_key,
    seal_client_info, seal_server_info, server_info_frame, server_key_frame, HandshakeError,
};
pub use header::{FrameHeader, FrameType};
pub use info::{ClientInfo, InfoError, ServerInfo};

/// First 8 bytes of the ServerKey payload: "DERP" followed by the UTF-8 key emoji (U+1F511).
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91];
/// DERP protocol version spoken (v2: RecvPacket carries the 32-byte source key).
pub const PROTOCOL_VERSION: i64 = 2;
/// Frame header: 1 type byte + big-endian u32 payload length.
pub const FRAME_HEADER_LEN: usize = 5;
/// Maximum packet bytes in Send/Recv/ForwardPacket, excluding keys and header.
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Largest frame payload a client accepts when receiving (`derp.Client.recvTimeout`).
pub const MAX_FRAME_SIZE: usize = 1 << 20;
/// Largest ClientInfo frame payload the server accepts (`recvClientKey`).
pub const MAX_CLIENT_INFO_LEN: usize = 256 << 10;
/// Largest ServerInfo frame payload a client accepts (`maxInfoLen`).
pub const MAX_SERVER_INFO_LEN: usize = 1 << 20;
/// Largest ServerKey frame payload a client reads before the handshake.
pub const MAX_SERVER_KEY_LEN: usize = 1 << 10;
/// ServerKey payload: magic + key (more bytes are allowed "for future use").
pub const SERVER_KEY_LEN: usize = MAGIC.len() + KEY_LEN;
/// Minimum ClientInfo payload: client key + nonce.
pub const MIN_CLIENT_INFO_LEN: usize = KEY_LEN + NONCE_LEN;
/// Ping payload length that is echoed in Pong.
pub const PING_LEN: usize = 8;
/// Longest Ping payload the server accepts (only the first 8 bytes are echoed).
pub const MAX_PING_LEN: usize = 1000;
/// Payload of the PeerPresent frame we emit: key + 16-byte IP + BE port + flags.
pub const PEER_PRESENT_LEN: usize = KEY_LEN + 16 + 2 + 1;
/// The server sends a KeepAlive at least this often (plus jitter chosen by the caller).
pub const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// The 6-byte prefix of a disco message (`disco.Magic`, "TS" + U+1F4AC).
pub const DISCO_MAGIC: [u8; 6] = [0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
/// Minimum length of a disco packet: magic + 32-byte sender disco key + 24-byte nonce.
pub const DISCO_MIN_LEN: usize = DISCO_MAGIC.len() + KEY_LEN + NONCE_LEN;
