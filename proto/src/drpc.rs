//! dRPC wire codec (storj.io/drpc v0.0.34 `drpcwire`), the transport Coder runs on every yamux
//! stream.
//!
//! Why: Coder's Go agents and clients speak dRPC, not gRPC; a server must parse and emit the exact
//! frame layout and enforce the same reader rules (monotonic ids, 4 MiB packets) so misbehaving peers
//! are cut off exactly where Go would cut them off.
//!
//! Layout of one frame: `control byte | varint stream_id | varint message_id | varint data_len |
//! data`. The control byte carries `done` (bit 0), the packet kind (bits 1-6) and a `control` flag
//! (bit 7; frames with the control bit and an unknown kind are ignored for forward compatibility).
//! Varints are unsigned LEB128 of at most 10 bytes / 64 bits.
//!
//! This module is pure: it never does I/O, never allocates more than the caller's input plus one
//! bounded packet ([`MAX_PACKET_SIZE`]), and never panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::BTreeMap;

/// Largest reassembled packet accepted (drpc `MaximumBufferSize`, Coder `drpcsdk.MaxMessageSize`).
pub const MAX_PACKET_SIZE: usize = 4 << 20;
/// Largest data carried by one frame when splitting a packet (drpc `SplitSize` 0 ⇒ 64 KiB).
pub const MAX_FRAME_DATA: usize = 64 * 1024;
/// Largest frame data length accepted by [`Frame::decode`]; a frame cannot carry more than a whole
/// packet, so anything larger is malformed (and would otherwise make us buffer without bound).
pub const MAX_FRAME_DATA_ACCEPTED: usize = MAX_PACKET_SIZE;
/// Longest encoding of a `u64` varint.
pub const MAX_VARINT_LEN: usize = 10;
/// Worst-case frame header: control byte + three 10-byte varints.
pub const MAX_FRAME_HEADER_LEN: usize = 1 + 3 * MAX_VARINT_LEN;
/// `drpcerr.Unimplemented`: the error code Coder clients treat as "method not supported".
pub const UNIMPLEMENTED: u64 = 12;

const DONE_BIT: u8 = 0x01;
const CONTROL_BIT: u8 = 0x80;
const KIND_MASK: u8 = 0x3f;

/// dRPC packet kind (6 bits of the control byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// RPC method name; starts a stream.
    Invoke,
    /// One protobuf-encoded message.
    Message,
    /// 8-byte big-endian code + UTF-8 text.
    Error,
    /// Soft cancel (sent with the control bit).
    Cancel,
    /// Terminates the stream in both directions.
    Close,
    /// Half-close: the sender sends no more messages.
    CloseSend,
    /// Metadata map preceding an Invoke.
    InvokeMetadata,
    /// Any other 6-bit value (0 is reserved, 8..=63 unassigned).
    Unknown(u8),
}

impl Kind {
    /// Decodes the 6-bit kind value (higher bits are ignored).
    pub fn from_bits(v: u8) -> Kind {
        match v & KIND_MASK {
            1 => Kind::Invoke,
            2 => Kind::Message,
            3 => Kind::Error,
            4 => Kind::Cancel,
            5 => Kind::Close,
            6 => Kind::CloseSend,
            7 => Kind::InvokeMetadata,
            other => Kind::Unknown(other),
        }
    }

    /// The 6-bit kind value.
    pub fn to_bits(self) -> u8 {
        match self {
            Kind::Invoke => 1,
            Kind::Message => 2,
            Kind::Error => 3,
            Kind::Cancel => 4,
            Kind::Close => 5,
            Kind::CloseSend => 6,
            Kind::InvokeMetadata => 7,
            Kind::Unknown(v) => v & KIND_MASK,
        }
    }

    /// Whether this is one of the seven kinds defined by drpc v0.0.34.
    pub fn is_known(self) -> bool {
        !matches!(self, Kind::Unknown(_))
    }
}

/// Errors from the frame parser and the packet reassembler. Each one is fatal for the transport
/// (the Go implementation closes the connection on all of them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrpcError {
    /// A varint ran past 10 bytes or past 64 bits.
    #[error("drpc: varint overflows 64 bits")]
    VarintOverflow,
    /// A frame declared more data than any packet may hold.
    #[error("drpc: frame data length {0} exceeds maximum")]
    FrameTooLarge(u64),
    /// A frame carried a (stream, message) id lower than the reader expects.
    #[error("drpc: id monotonicity violation: got ({got_stream},{got_message}), expected >= ({want_stream},{want_message})")]
    MonotonicityViolation {
        /// Stream id of the offending frame.
        got_stream: u64,
        /// Message id of the offending frame.
        got_message: u64,
        /// Lowest acceptable stream id.
        want_stream: u64,
        /// Lowest acceptable message id (for `want_stream`).
        want_message: u64,
    },
    /// A frame changed the kind of a packet in progress.
    #[error("drpc: packet kind change")]
    KindChange,
    /// A reassembled packet exceeded [`MAX_PACKET_SIZE`].
    #[error("drpc: data overflow")]
    DataOverflow,
    /// A protobuf-like body (InvokeMetadata) was malformed.
    #[error("drpc: malformed metadata: {0}")]
    Metadata(String),
}

/// Reads an unsigned LEB128 varint. `Ok(None)` means more bytes are needed.
pub fn read_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, DrpcError> {
    let mut out: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(MAX_VARINT_LEN) {
        let low = u64::from(b & 0x7f);
        if i == MAX_VARINT_LEN - 1 && b > 1 {
            // The 10th byte may only contribute bit 63 and must end the varint.
            return Err(DrpcError::VarintOverflow);
        }
        out |= low << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((out, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        return Err(DrpcError::VarintOverflow);
    }
    Ok(None)
}

/// Appends `v` as an unsigned LEB128 varint.
pub fn put_varint(mut v: u64, out: &mut impl BufMut) {
    while v >= 0x80 {
        out.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// Number of bytes `put_varint(v)` writes.
pub fn varint_len(v: u64) -> usize {
    let bits = 64 - v.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// One dRPC frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Stream id (one per RPC on a transport; Coder uses 1).
    pub stream_id: u64,
    /// Message (packet) id within the stream, counted per direction from 1.
    pub message_id: u64,
    /// Packet kind.
    pub kind: Kind,
    /// Last frame of its packet.
    pub done: bool,
    /// Control flag (unknown kinds with it set are ignored by readers).
    pub control: bool,
    /// Frame payload.
    pub data: Bytes,
}

impl Frame {
    /// The control byte for this frame.
    pub fn control_byte(&self) -> u8 {
        let mut b = (self.kind.to_bits() & KIND_MASK) << 1;
        if self.done {
            b |= DONE_BIT;
        }
        if self.control {
            b |= CONTROL_BIT;
        }
        b
    }

    /// Parses the header of a frame at the start of `buf`. Returns the frame fields (with empty data)
    /// plus the header length and data length, or `None` if the header is incomplete.
    fn parse_header(buf: &[u8]) -> Result<Option<(Frame, usize, usize)>, DrpcError> {
        let Some(&cb) = buf.first() else {
            return Ok(None);
        };
        let mut pos = 1;
        let next = |pos: &mut usize| -> Result<Option<u64>, DrpcError> {
            match read_varint(buf.get(*pos..).unwrap_or(&[]))? {
                Some((v, n)) => {
                    *pos += n;
                    Ok(Some(v))
                }
                None => Ok(None),
            }
        };
        let Some(stream_id) = next(&mut pos)? else {
            return Ok(None);
        };
        let Some(message_id) = next(&mut pos)? else {
            return Ok(None);
        };
        let Some(len) = next(&mut pos)? else {
            return Ok(None);
        };
        if len > MAX_FRAME_DATA_ACCEPTED as u64 {
            return Err(DrpcError::FrameTooLarge(len));
        }
        let frame = Frame {
            stream_id,
            message_id,
            kind: Kind::from_bits(cb >> 1),
            done: cb & DONE_BIT != 0,
            control: cb & CONTROL_BIT != 0,
            data: Bytes::new(),
        };
        // `len` ≤ 4 MiB, so the cast is lossless.
        Ok(Some((frame, pos, len as usize)))
    }

    /// Parses one frame from the start of `buf`, copying its data. Returns the frame and the number
    /// of bytes consumed, `Ok(None)` if `buf` does not yet hold a whole frame, or an error if the
    /// bytes can never form a valid frame.
    pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, DrpcError> {
        let Some((mut frame, hdr, len)) = Frame::parse_header(buf)? else {
            return Ok(None);
        };
        let Some(data) = buf.get(hdr..hdr + len) else {
            return Ok(None);
        };
        frame.data = Bytes::copy_from_slice(data);
        Ok(Some((frame, hdr + len)))
    }

    /// Like [`Frame::parse`] but consumes the frame from `buf` without copying its data.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, DrpcError> {
        let Some((mut frame, hdr, len)) = Frame::parse_header(buf)? else {
            return Ok(None);
        };
        if buf.len() < hdr + len {
            return Ok(None);
        }
        buf.advance(hdr);
        frame.data = buf.split_to(len).freeze();
        Ok(Some(frame))
    }

    /// Encoded size of this frame.
    pub fn encoded_len(&self) -> usize {
        1 + varint_len(self.stream_id)
            + varint_len(self.message_id)
            + varint_len(self.data.len() as u64)
            + self.data.len()
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        out.put_u8(self.control_byte());
        put_varint(self.stream_id, out);
        put_varint(self.message_id, out);
        put_varint(self.data.len() as u64, out);
        out.extend_from_slice(&self.data);
    }
}

/// Encodes one packet as frames of at most [`MAX_FRAME_DATA`] bytes each (an empty body is one
/// frame with `done`). Does not check [`MAX_PACKET_SIZE`]; callers must not send larger packets.
pub fn encode_packet(stream_id: u64, message_id: u64, kind: Kind, data: &[u8], out: &mut BytesMut) {
    encode_packet_with(stream_id, message_id, kind, false, data, out);
}

/// Like [`encode_packet`] but lets the caller set the control bit (used for soft Cancel).
pub fn encode_packet_with(
    stream_id: u64,
    message_id: u64,
    kind: Kind,
    control: bool,
    data: &[u8],
    out: &mut BytesMut,
) {
    let mut cb = (kind.to_bits() & KIND_MASK) << 1;
    if control {
        cb |= CONTROL_BIT;
    }
    let mut rest = data;
    loop {
        let n = rest.len().min(MAX_FRAME_DATA);
        let (chunk, tail) = rest.split_at(n);
        let done = tail.is_empty();
        out.reserve(MAX_FRAME_HEADER_LEN + n);
        out.put_u8(if done { cb | DONE_BIT } else { cb });
        put_varint(stream_id, out);
        put_varint(message_id, out);
        put_varint(n as u64, out);
        out.extend_from_slice(chunk);
        if done {
            return;
        }
        rest = tail;
    }
}

/// A reassembled dRPC packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Stream id.
    pub stream_id: u64,
    /// Message id.
    pub message_id: u64,
    /// Kind (may be `Kind::Unknown` when the control bit was not set; the consumer decides).
    pub kind: Kind,
    /// Control bit of the packet's frames.
    pub control: bool,
    /// Concatenated frame data (≤ [`MAX_PACKET_SIZE`]).
    pub data: Bytes,
}

struct Partial {
    stream_id: u64,
    message_id: u64,
    kind: Kind,
    control: bool,
    data: BytesMut,
}

/// Reader-side state machine turning frames into packets, with drpc's rules: the first expected id
/// is (1,1); all frames of a packet share (stream, message) and kind; a frame with a new id discards
/// a partial packet; ids must never go below the expected id; packets are capped at
/// [`MAX_PACKET_SIZE`]; frames with the control bit and an unknown kind are ignored.
pub struct PacketAssembler {
    want_stream: u64,
    want_message: u64,
    partial: Option<Partial>,
    ignored: u64,
    discarded: u64,
}

impl std::fmt::Debug for PacketAssembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketAssembler")
            .field("want_stream", &self.want_stream)
            .field("want_message", &self.want_message)
            .field("partial_len", &self.partial.as_ref().map(|p| p.data.len()))
            .finish()
    }
}

impl Default for PacketAssembler {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketAssembler {
    /// A fresh reader expecting id (1,1).
    pub fn new() -> Self {
        PacketAssembler {
            want_stream: 1,
            want_message: 1,
            partial: None,
            ignored: 0,
            discarded: 0,
        }
    }

    /// The lowest (stream, message) id the next frame may carry.
    pub fn expected_id(&self) -> (u64, u64) {
        (self.want_stream, self.want_message)
    }

    /// Frames ignored so far (control bit + unknown kind).
    pub fn ignored_frames(&self) -> u64 {
        self.ignored
    }

    /// Partial packets discarded so far because a frame with a new id arrived.
    pub fn discarded_partials(&self) -> u64 {
        self.discarded
    }

    /// Bytes buffered in the packet currently being assembled.
    pub fn buffered(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.data.len())
    }

    /// Feeds one frame. Returns a packet when `frame` completes one. Any error is fatal for the
    /// transport; the assembler should not be used after it.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Packet>, DrpcError> {
        if frame.control && !frame.kind.is_known() {
            self.ignored += 1;
            return Ok(None);
        }
        let id = (frame.stream_id, frame.message_id);
        if id < (self.want_stream, self.want_message) {
            return Err(DrpcError::MonotonicityViolation {
                got_stream: frame.stream_id,
                got_message: frame.message_id,
                want_stream: self.want_stream,
                want_message: self.want_message,
            });
        }
        let same = self
            .partial
            .as_ref()
            .is_some_and(|p| (p.stream_id, p.message_id) == id);
        if same {
            if let Some(p) = self.partial.as_ref() {
                if p.kind != frame.kind {
                    return Err(DrpcError::KindChange);
                }
            }
        } else {
            if self.partial.is_some() {
                self.discarded += 1;
            }
            self.want_stream = frame.stream_id;
            self.want_message = frame.message_id;
            self.partial = Some(Partial {
                stream_id: frame.stream_id,
                message_id: frame.message_id,
                kind: frame.kind,
                control: frame.control,
                data: BytesMut::new(),
            });
        }
        let Some(p) = self.partial.as_mut() else {
            return Ok(None);
        };
        if p.data.len() + frame.data.len() > MAX_PACKET_SIZE {
            self.partial = None;
            return Err(DrpcError::DataOverflow);
        }
        if !frame.done {
            p.data.extend_from_slice(&frame.data);
            return Ok(None);
        }
        let Some(p) = self.partial.take() else {
            return Ok(None);
        };
        let data = if p.data.is_empty() {
            // Single-frame packet: reuse the frame's buffer without copying.
            frame.data
        } else {
            let mut d = p.data;
            d.extend_from_slice(&frame.data);
            d.freeze()
        };
        self.want_message = p.message_id.saturating_add(1);
        Ok(Some(Packet {
            stream_id: p.stream_id,
            message_id: p.message_id,
            kind: p.kind,
            control: p.control,
            data,
        }))
    }

    /// Decodes as many frames as `buf` holds and pushes them, calling `on_packet` for every
    /// completed packet. Leaves an incomplete trailing frame in `buf`.
    pub fn feed(
        &mut self,
        buf: &mut BytesMut,
        mut on_packet: impl FnMut(Packet),
    ) -> Result<(), DrpcError> {
        while let Some(frame) = Frame::decode(buf)? {
            if let Some(pkt) = self.push(frame)? {
                on_packet(pkt);
            }
        }
        Ok(())
    }
}

/// Builds an Error packet body: 8-byte big-endian code followed by the message text.
pub fn encode_error(code: u64, msg: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + msg.len());
    b.put_u64(code);
    b.extend_from_slice(msg.as_bytes());
    b.freeze()
}

/// Parses an Error packet body. Like drpc's `UnmarshalError`, a body shorter than 8 bytes is all
/// message with code 0. Invalid UTF-8 is replaced, never rejected.
pub fn decode_error(body: &[u8]) -> (u64, String) {
    match body.split_first_chunk::<8>() {
        Some((code, msg)) => (
            u64::from_be_bytes(*code),
            String::from_utf8_lossy(msg).into_owned(),
        ),
        None => (0, String::from_utf8_lossy(body).into_owned()),
    }
}

/// The error text drpcmux sends for an unknown method (sent with code 0).
pub fn unknown_rpc_message(method: &str) -> String {
    format!("protocol error: unknown rpc: {method:?}")
}

/// Whether an Error packet means "method not implemented", by Coder's rule
/// (`tailnet.IsDRPCUnimplementedError`: code 12, or the text contains `unknown rpc: `).
pub fn is_unimplemented(code: u64, msg: &str) -> bool {
    code == UNIMPLEMENTED || msg.contains("unknown rpc: ")
}

fn read_len_delimited(buf: &[u8]) -> Result<(&[u8], &[u8]), DrpcError> {
    let (len, n) =
        read_varint(buf)?.ok_or_else(|| DrpcError::Metadata("truncated length".into()))?;
    let rest = buf.get(n..).unwrap_or(&[]);
    let len = usize::try_from(len).map_err(|_| DrpcError::Metadata("length too large".into()))?;
    if rest.len() < len {
        return Err(DrpcError::Metadata("truncated field".into()));
    }
    Ok(rest.split_at(len))
}

fn skip_field(wire_type: u64, buf: &[u8]) -> Result<&[u8], DrpcError> {
    match wire_type {
        0 => {
            let (_, n) =
                read_varint(buf)?.ok_or_else(|| DrpcError::Metadata("truncated varint".into()))?;
            Ok(buf.get(n..).unwrap_or(&[]))
        }
        1 => buf
            .get(8..)
            .ok_or_else(|| DrpcError::Metadata("truncated fixed64".into())),
        2 => read_len_delimited(buf).map(|(_, rest)| rest),
        5 => buf
            .get(4..)
            .ok_or_else(|| DrpcError::Metadata("truncated fixed32".into())),
        other => Err(DrpcError::Metadata(format!(
            "unsupported wire type {other}"
        ))),
    }
}

/// Decodes an InvokeMetadata body: protobuf `map<string,string>` in field 1 (entries with key = 1,
/// value = 2). Unknown fields are skipped; later duplicates win. Invalid UTF-8 is replaced.
pub fn decode_metadata(body: &[u8]) -> Result<BTreeMap<String, String>, DrpcError> {
    let mut out = BTreeMap::new();
    let mut buf = body;
    while !buf.is_empty() {
        let (tag, n) =
            read_varint(buf)?.ok_or_else(|| DrpcError::Metadata("truncated tag".into()))?;
        buf = buf.get(n..).unwrap_or(&[]);
        let (field, wt) = (tag >> 3, tag & 7);
        if field == 1 && wt == 2 {
            let (entry, rest) = read_len_delimited(buf)?;
            buf = rest;
            let (mut key, mut value) = (String::new(), String::new());
            let mut e = entry;
            while !e.is_empty() {
                let (tag, n) = read_varint(e)?
                    .ok_or_else(|| DrpcError::Metadata("truncated entry tag".into()))?;
                e = e.get(n..).unwrap_or(&[]);
                let (f, wt) = (tag >> 3, tag & 7);
                if (f == 1 || f == 2) && wt == 2 {
                    let (v, rest) = read_len_delimited(e)?;
                    e = rest;
                    let s = String::from_utf8_lossy(v).into_owned();
                    if f == 1 {
                        key = s;
                    } else {
                        value = s;
                    }
                } else {
                    e = skip_field(wt, e)?;
                }
            }
            out.insert(key, value);
        } else {
            buf = skip_field(wt, buf)?;
        }
    }
    Ok(out)
}

/// Encodes an InvokeMetadata body (inverse of [`decode_metadata`]).
pub fn encode_metadata<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> Bytes {
    let mut out = BytesMut::new();
    for (k, v) in entries {
        let entry_len =
            1 + varint_len(k.len() as u64) + k.len() + 1 + varint_len(v.len() as u64) + v.len();
        out.put_u8(0x0a);
        put_varint(entry_len as u64, &mut out);
        out.put_u8(0x0a);
        put_varint(k.len() as u64, &mut out);
        out.extend_from_slice(k.as_bytes());
        out.put_u8(0x12);
        put_varint(v.len() as u64, &mut out);
        out.extend_from_slice(v.as_bytes());
    }
    out.freeze()
}
