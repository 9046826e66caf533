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
//!   slice of what it received without copying. A datagram is led by its sequence number
//!   (`seq u64 BE`, from 0 on each connection): datagrams are unreliable, and the numbers are how
//!   the receiver counts those that never arrived, wherever they were lost (the path, or a
//!   receive buffer inside the QUIC stack that drops the oldest when full): [`DatagramLoss`].
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
pub const ALPN: &[u8] = b"tailnetd-mesh/2";
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
/// Length of the sequence number that leads a datagram.
pub const SEQ_LEN: usize = 8;
/// How far behind the highest sequence number a datagram may arrive and still fill its gap;
/// a gap further behind is counted lost ([`DatagramLoss`]).
pub const LOSS_WINDOW: u64 = 4096;

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

/// Builds a datagram: sequence number, then the packet unit of [`encode_packet`].
pub fn encode_datagram(seq: u64, dst: &NodePublic, recv_frame: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(SEQ_LEN + KEY_LEN + recv_frame.len());
    b.put_u64(seq);
    b.put_slice(dst.as_bytes());
    b.put_slice(recv_frame);
    b.freeze()
}

/// Splits a received datagram into its sequence number and its packet unit, checked as
/// [`decode_packet`] does.
pub fn decode_datagram(d: Bytes) -> Result<(u64, NodePublic, Bytes), QuicMeshError> {
    if d.len() < SEQ_LEN {
        return Err(QuicMeshError::ShortPacket(d.len()));
    }
    let mut seq = [0u8; SEQ_LEN];
    seq.copy_from_slice(&d[..SEQ_LEN]);
    let (dst, frame) = decode_packet(d.slice(SEQ_LEN..))?;
    Ok((u64::from_be_bytes(seq), dst, frame))
}

const LOSS_WORDS: usize = (LOSS_WINDOW / 64) as usize;

/// Counts the datagrams of one connection that never arrived, from the sequence numbers of
/// those that did.
///
/// A missing number is counted lost once it falls [`LOSS_WINDOW`] behind the highest number
/// seen (QUIC reorders datagrams only within what is in flight), or when the connection ends
/// ([`DatagramLoss::finish`]). One that arrives after being counted is counted as late
/// instead of changing the past. Constant memory (a 512-byte ring of received bits) and
/// constant work per datagram, whatever numbers a peer sends.
#[derive(Debug, Clone)]
pub struct DatagramLoss {
    /// One past the highest number seen.
    next: u64,
    /// Bit `s % LOSS_WINDOW`: whether `s` arrived, for `s` in the window below `next`.
    received: [u64; LOSS_WORDS],
    late: u64,
}

impl Default for DatagramLoss {
    fn default() -> Self {
        DatagramLoss {
            next: 0,
            received: [0; LOSS_WORDS],
            late: 0,
        }
    }
}

impl DatagramLoss {
    /// Records the arrival of `seq`; returns how many numbers this made count as lost.
    pub fn receive(&mut self, seq: u64) -> u64 {
        if seq == u64::MAX {
            // No sender numbers that far (2^64 datagrams); counted, not tracked.
            self.late += 1;
            return 0;
        }
        if seq < self.next {
            if self.next - seq > LOSS_WINDOW || self.bit(seq) {
                // Already counted lost, or a duplicate (QUIC itself never duplicates).
                self.late += 1;
            } else {
                self.set(seq);
            }
            return 0;
        }
        let mut lost = 0;
        let advance = seq - self.next + 1;
        if advance >= LOSS_WINDOW {
            // Everything in the window leaves it; of the numbers skipped, those that do not fit
            // in the new window below `seq` are lost now, the rest stay pending.
            lost += self.missing_in_window();
            lost += (seq - self.next) - (LOSS_WINDOW - 1);
            self.received = [0; LOSS_WORDS];
        } else {
            for s in self.next..seq {
                lost += self.evict(s);
                self.clear(s);
            }
            lost += self.evict(seq);
        }
        self.next = seq + 1;
        self.set(seq);
        lost
    }

    /// The connection ended: every number still missing in the window is lost.
    pub fn finish(&mut self) -> u64 {
        let lost = self.missing_in_window();
        self.received = [0; LOSS_WORDS];
        self.next = 0;
        lost
    }

    /// Datagrams that arrived after they had been counted lost, or twice.
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Numbers in the window below `next` (and at least 0) that have not arrived.
    fn missing_in_window(&self) -> u64 {
        let got = if self.next >= LOSS_WINDOW {
            self.received
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum()
        } else {
            (0..self.next).filter(|&s| self.bit(s)).count() as u64
        };
        self.next.min(LOSS_WINDOW) - got
    }

    /// Making room for `s` evicts `s - LOSS_WINDOW`: 1 if that number existed and never came.
    fn evict(&self, s: u64) -> u64 {
        u64::from(s >= LOSS_WINDOW && !self.bit(s - LOSS_WINDOW))
    }

    fn bit(&self, s: u64) -> bool {
        let i = (s % LOSS_WINDOW) as usize;
        self.received[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, s: u64) {
        let i = (s % LOSS_WINDOW) as usize;
        self.received[i / 64] |= 1 << (i % 64);
    }

    fn clear(&mut self, s: u64) {
        let i = (s % LOSS_WINDOW) as usize;
        self.received[i / 64] &= !(1 << (i % 64));
    }
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
    fn datagrams_round_trip_with_their_sequence() {
        let mut frame = BytesMut::new();
        encode_recv_packet(&mut frame, &key(3), b"hello");
        let (seq, dst, f) =
            decode_datagram(encode_datagram(u64::MAX - 1, &key(4), &frame)).unwrap();
        assert_eq!((seq, dst), (u64::MAX - 1, key(4)));
        assert_eq!(&f[..], &frame[..]);
        assert_eq!(
            decode_datagram(Bytes::from_static(&[0; 7])),
            Err(QuicMeshError::ShortPacket(7))
        );
        assert_eq!(
            decode_datagram(Bytes::from(vec![0u8; SEQ_LEN + 3])),
            Err(QuicMeshError::ShortPacket(3))
        );
    }

    /// Counts by brute force what `DatagramLoss` must report: a number is lost when it never
    /// arrives before the highest number seen passes it by the window.
    fn expected_loss(arrivals: &[u64]) -> (u64, u64) {
        let mut seen = std::collections::HashSet::new();
        let mut counted = std::collections::HashSet::new();
        let mut next = 0u64;
        let mut low = 0u64;
        let mut late = 0;
        for &s in arrivals {
            if s < next && (next - s > LOSS_WINDOW || seen.contains(&s) || counted.contains(&s)) {
                late += 1;
                continue;
            }
            seen.insert(s);
            next = next.max(s + 1);
            for m in low..next.saturating_sub(LOSS_WINDOW) {
                if !seen.contains(&m) {
                    counted.insert(m);
                }
            }
            low = low.max(next.saturating_sub(LOSS_WINDOW));
        }
        let lost_total = (0..next).filter(|m| !seen.contains(m)).count() as u64;
        (lost_total, late)
    }

    #[test]
    fn loss_counts_gaps_once_the_window_passes_and_the_rest_at_the_end() {
        let mut l = DatagramLoss::default();
        // In order: nothing lost.
        for s in 0..10_000 {
            assert_eq!(l.receive(s), 0);
        }
        // 10_000 and 10_001 missing; 10_001 arrives late but within the window.
        assert_eq!(l.receive(10_002), 0);
        assert_eq!(l.receive(10_001), 0);
        // Only when the window passes 10_000 is it counted.
        for s in 10_003..10_000 + LOSS_WINDOW {
            assert_eq!(l.receive(s), 0);
        }
        assert_eq!(l.receive(10_000 + LOSS_WINDOW), 1);
        // Arriving now, it is late.
        assert_eq!(l.receive(10_000), 0);
        assert_eq!(l.late(), 1);
        // A jump far ahead: everything skipped beyond the window at once, the rest at the end.
        let from = 10_000 + LOSS_WINDOW + 1;
        let to = from + 3 * LOSS_WINDOW;
        let skipped = to - from;
        let now = l.receive(to);
        let pending = LOSS_WINDOW - 1;
        assert_eq!(now, skipped - pending);
        assert_eq!(l.finish(), pending);
        // The one number that cannot be tracked is counted as late, and nothing breaks.
        assert_eq!(l.receive(u64::MAX), 0);
        assert_eq!(l.late(), 2);
        assert_eq!(l.receive(u64::MAX - 1), u64::MAX - 1 - (LOSS_WINDOW - 1));
    }

    #[test]
    fn loss_matches_brute_force_on_shuffled_arrivals() {
        // A deterministic pseudo-random walk: drops, reordering, duplicates, jumps.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20 {
            let mut arrivals = Vec::new();
            let mut s = 0u64;
            for _ in 0..3_000 {
                let r = rnd() % 100;
                match r {
                    0..=79 => {}
                    80..=89 => s += rnd() % 8, // a few lost
                    90..=94 => s = s.saturating_sub(rnd() % 64), // reordered / duplicate
                    95..=97 => s += rnd() % (2 * LOSS_WINDOW), // a burst lost
                    _ => s = s.saturating_sub(LOSS_WINDOW + rnd() % 10), // far too late
                }
                arrivals.push(s);
                s += 1;
            }
            let mut l = DatagramLoss::default();
            let mut lost: u64 = arrivals.iter().map(|&a| l.receive(a)).sum();
            lost += l.finish();
            let (want_lost, want_late) = expected_loss(&arrivals);
            assert_eq!((lost, l.late()), (want_lost, want_late), "round {round}");
        }
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
