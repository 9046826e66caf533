//! A DERP client over any byte stream that is already past HTTP (TCP after the 101, TLS, or a
//! WebSocket byte stream): our tests, the load generator and the outbound mesh links
//! ([`crate::mesh`]) use it.
//!
//! Why it looks like Go's `derp.Client`: the handshake reads ServerKey (unless the key is
//! already known, e.g. from the TLS meta cert), sends ClientInfo and returns immediately — it
//! does not wait for ServerInfo, which arrives through [`Client::recv`] like every other frame.
//! The client splits into a [`ClientReader`] and a [`ClientWriter`] so a caller can send and
//! receive concurrently; [`Client::handshake_split`] takes halves that are already separate
//! (e.g. `TcpStream::into_split`) so the two never share a lock.
//!
//! Why the buffers look the way they do: the load generator drives hundreds of thousands of
//! packets per second through this client on one core, so the client must cost no more than a
//! plain TCP copy loop. The reader keeps at least [`READ_CHUNK`] bytes free before every read
//! (one `recv` takes whatever the socket holds) and parses every complete frame buffered;
//! [`ClientReader::recv_packets`] hands packets out borrowed from that buffer (no allocation,
//! no reference counting). The writer appends frames to one reusable buffer and writes it
//! with one `write` per [`ClientWriter::flush`].
//!
//! Must never: buffer a frame larger than 1 MiB (that is an error, as in Go), send a packet
//! larger than 64 KiB, or panic on anything the server sends.
//!
//! [`dial`] reaches a server by URL (TCP, TLS, HTTP upgrade or WebSocket) and hands the stream
//! to [`Client`].

pub mod dial;
pub mod probe;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use proto::derp::{
    client_info_frame, open_server_info, parse_server_key, ClientInfo, Frame, FrameError,
    FrameHeader, FrameType, HandshakeError, PeerGoneReason, PeerPresentFlags, ServerInfo,
    FRAME_HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE, MAX_PACKET_SIZE, MAX_SERVER_KEY_LEN,
    PROTOCOL_VERSION,
};
use proto::key::{MeshKey, NodePrivate, NodePublic};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Object-safe alias for the transports a client can run over.
pub trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientIo for T {}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Free space the reader guarantees in its buffer before every read, so one read takes up to
/// this much of whatever the transport holds (instead of only the rest of the current frame).
pub const READ_CHUNK: usize = 64 << 10;

/// Handshake options.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Mesh key to present (makes this client a mesh peer if it matches the server's).
    pub mesh_key: Option<MeshKey>,
    /// Advertise `CanAckPings` (Tailscale clients send true).
    pub can_ack_pings: bool,
    /// The server's key when already known (fast start): the ServerKey frame is then not
    /// awaited, and skipped when it arrives.
    pub server_key: Option<NodePublic>,
    /// Advertise `IsProber`.
    pub is_prober: bool,
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Transport error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The handshake failed (bad ServerKey, ServerInfo that does not open, ...).
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// A frame from the server did not decode.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The server sent a frame over 1 MiB.
    #[error("frame of {0} bytes exceeds 1 MiB")]
    FrameTooLarge(usize),
    /// A packet to send exceeds 64 KiB.
    #[error("packet of {0} bytes exceeds 64 KiB")]
    PacketTooLarge(usize),
    /// The server closed the connection.
    #[error("connection closed")]
    Closed,
    /// The first frame was not ServerKey.
    #[error("expected ServerKey, got frame type 0x{0:02x}")]
    UnexpectedFrame(u8),
}

/// A frame received from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceivedFrame {
    /// A relayed packet from `src`.
    Packet {
        /// Sender's key.
        src: NodePublic,
        /// Packet bytes.
        data: Bytes,
    },
    /// `key` is gone (Disconnected) or not known here (NotHere).
    PeerGone {
        /// The peer.
        key: NodePublic,
        /// Why.
        reason: PeerGoneReason,
    },
    /// Mesh watchers: `key` connected.
    PeerPresent {
        /// The peer.
        key: NodePublic,
        /// Its address, if sent.
        addr: Option<SocketAddr>,
        /// Its flags.
        flags: PeerPresentFlags,
    },
    /// The server's ServerInfo (opened).
    ServerInfo(ServerInfo),
    /// KeepAlive.
    KeepAlive,
    /// The server pinged us.
    Ping([u8; 8]),
    /// Reply to our ping.
    Pong([u8; 8]),
    /// Health problem text (empty = healthy).
    Health(String),
    /// The server is restarting.
    Restarting {
        /// Reconnect after this long.
        reconnect_in: Duration,
        /// Keep trying for this long.
        try_for: Duration,
    },
    /// A frame type this client does not interpret.
    Unknown {
        /// Type byte.
        typ: u8,
        /// Payload.
        payload: Bytes,
    },
}

/// The receiving half.
pub struct ClientReader {
    rd: BoxRead,
    buf: BytesMut,
    private_key: NodePrivate,
    server_key: NodePublic,
}

impl std::fmt::Debug for ClientReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientReader")
            .field("server_key", &self.server_key)
            .finish_non_exhaustive()
    }
}

/// The sending half.
pub struct ClientWriter {
    wr: BoxWrite,
    /// Frames not yet written; a plain `Vec` so that clearing it keeps the whole allocation at
    /// offset 0 (a `BytesMut` advanced by a write would later move its tail back with memmove).
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already written (a cancelled flush resumes from here).
    written: usize,
}

impl std::fmt::Debug for ClientWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientWriter").finish_non_exhaustive()
    }
}

/// A connected DERP client.
#[derive(Debug)]
pub struct Client {
    reader: ClientReader,
    writer: ClientWriter,
    server_key: NodePublic,
    public_key: NodePublic,
}

/// Type and payload length of the complete frame at the front of `buf`; `None` while bytes
/// are missing. A header announcing more than `max` payload bytes is an error right away.
fn complete_frame(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, ClientError> {
    let Some(h) = FrameHeader::decode(buf) else {
        return Ok(None);
    };
    let len = h.payload_len();
    if len > max {
        return Err(ClientError::FrameTooLarge(len));
    }
    if buf.len() < FRAME_HEADER_LEN + len {
        return Ok(None);
    }
    Ok(Some((h.typ, len)))
}

/// Reads once into `buf`, with room for at least [`READ_CHUNK`] bytes and for the rest of the
/// frame at its front (whose header says it is `max`-bounded; see [`complete_frame`]).
async fn fill(
    rd: &mut (impl AsyncRead + Unpin + ?Sized),
    buf: &mut BytesMut,
) -> Result<(), ClientError> {
    let frame_rest = FrameHeader::decode(buf).map_or(0, |h| {
        (FRAME_HEADER_LEN + h.payload_len()).saturating_sub(buf.len())
    });
    let want = frame_rest.max(READ_CHUNK);
    if buf.capacity() - buf.len() < want {
        // Unique buffer (the usual case): moves the partial frame to the front, no allocation.
        buf.reserve(want);
    }
    if rd.read_buf(buf).await? == 0 {
        return Err(ClientError::Closed);
    }
    Ok(())
}

/// Splits off the complete frame at the front of `buf`, reading more as needed.
async fn read_frame(
    rd: &mut (impl AsyncRead + Unpin + ?Sized),
    buf: &mut BytesMut,
    max: usize,
) -> Result<(u8, Bytes), ClientError> {
    loop {
        if let Some((typ, len)) = complete_frame(buf, max)? {
            buf.advance(FRAME_HEADER_LEN);
            return Ok((typ, buf.split_to(len).freeze()));
        }
        fill(rd, buf).await?;
    }
}

impl Client {
    /// Runs the client side of the handshake over `io` (`leftover` = bytes already read past
    /// the HTTP response head). Returns once ClientInfo is sent.
    pub async fn handshake<IO>(
        io: IO,
        leftover: Bytes,
        private_key: NodePrivate,
        opts: ClientOptions,
    ) -> Result<Client, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        Self::handshake_split(rd, wr, leftover, private_key, opts).await
    }

    /// [`handshake`](Self::handshake) over a transport whose halves are already separate (e.g.
    /// `TcpStream::into_split`): reader and writer then share no lock.
    pub async fn handshake_split<R, W>(
        rd: R,
        wr: W,
        leftover: Bytes,
        private_key: NodePrivate,
        opts: ClientOptions,
    ) -> Result<Client, ClientError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut rd: BoxRead = Box::new(rd);
        let mut wr: BoxWrite = Box::new(wr);
        let mut buf = BytesMut::from(&leftover[..]);
        let server_key = match opts.server_key {
            Some(k) => k,
            None => {
                let (typ, payload) = read_frame(&mut rd, &mut buf, MAX_SERVER_KEY_LEN).await?;
                if typ != FrameType::ServerKey.as_u8() {
                    return Err(ClientError::UnexpectedFrame(typ));
                }
                parse_server_key(&payload)?
            }
        };
        let info = ClientInfo {
            mesh_key: opts.mesh_key,
            version: PROTOCOL_VERSION,
            can_ack_pings: opts.can_ack_pings,
            is_prober: opts.is_prober,
            app_name: String::new(),
        };
        let mut nonce = [0u8; proto::derp::NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let frame = client_info_frame(&private_key, &server_key, &info, nonce);
        wr.write_all(&frame).await?;
        wr.flush().await?;
        let public_key = private_key.public();
        Ok(Client {
            reader: ClientReader {
                rd,
                buf,
                private_key,
                server_key,
            },
            writer: ClientWriter {
                wr,
                buf: Vec::new(),
                written: 0,
            },
            server_key,
            public_key,
        })
    }

    /// The server's public key.
    pub fn server_public_key(&self) -> NodePublic {
        self.server_key
    }

    /// Our public key.
    pub fn public_key(&self) -> NodePublic {
        self.public_key
    }

    /// Splits into independently usable halves.
    pub fn split(self) -> (ClientReader, ClientWriter) {
        (self.reader, self.writer)
    }

    /// The receiving half.
    pub fn reader(&mut self) -> &mut ClientReader {
        &mut self.reader
    }

    /// The sending half.
    pub fn writer(&mut self) -> &mut ClientWriter {
        &mut self.writer
    }

    /// See [`ClientReader::recv`].
    pub async fn recv(&mut self) -> Result<ReceivedFrame, ClientError> {
        self.reader.recv().await
    }

    /// See [`ClientReader::recv_packets`].
    pub async fn recv_packets<F>(
        &mut self,
        on_packet: F,
    ) -> Result<Option<ReceivedFrame>, ClientError>
    where
        F: FnMut(&NodePublic, &[u8]),
    {
        self.reader.recv_packets(on_packet).await
    }

    /// See [`ClientWriter::send_packet`].
    pub async fn send_packet(&mut self, dst: NodePublic, data: &[u8]) -> Result<(), ClientError> {
        self.writer.send_packet(dst, data).await
    }

    /// See [`ClientWriter::ping`].
    pub async fn ping(&mut self, data: [u8; 8]) -> Result<(), ClientError> {
        self.writer.ping(data).await
    }

    /// See [`ClientWriter::note_preferred`].
    pub async fn note_preferred(&mut self, preferred: bool) -> Result<(), ClientError> {
        self.writer.note_preferred(preferred).await
    }

    /// See [`ClientWriter::watch_conns`].
    pub async fn watch_conns(&mut self) -> Result<(), ClientError> {
        self.writer.watch_conns().await
    }

    /// See [`ClientWriter::close_peer`].
    pub async fn close_peer(&mut self, key: NodePublic) -> Result<(), ClientError> {
        self.writer.close_peer(key).await
    }

    /// See [`ClientWriter::forward_packet`].
    pub async fn forward_packet(
        &mut self,
        src: NodePublic,
        dst: NodePublic,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.writer.forward_packet(src, dst, data).await
    }

    /// See [`ClientWriter::send_raw_frame`].
    pub async fn send_raw_frame(&mut self, typ: u8, payload: &[u8]) -> Result<(), ClientError> {
        self.writer.send_raw_frame(typ, payload).await
    }
}

impl ClientReader {
    /// Receives the next frame. ServerKey frames (sent before ServerInfo even when the key was
    /// known) are skipped, as Go's client does.
    pub async fn recv(&mut self) -> Result<ReceivedFrame, ClientError> {
        loop {
            let (typ, payload) = read_frame(&mut self.rd, &mut self.buf, MAX_FRAME_SIZE).await?;
            if let Some(f) = self.decode(typ, payload)? {
                return Ok(f);
            }
        }
    }

    /// Receives packets without allocating: waits until at least one complete frame is
    /// buffered, then hands every buffered packet, in order, to `on_packet(src, data)` (`data`
    /// borrowed from the read buffer). Returns `None` once no complete frame is left after at
    /// least one packet, or the first frame that is not a packet (after the packets before
    /// it), decoded as [`recv`](Self::recv) would. ServerKey frames are skipped.
    ///
    /// Cancel safe: packets are only handed out between reads, never across an `.await`.
    pub async fn recv_packets<F>(
        &mut self,
        mut on_packet: F,
    ) -> Result<Option<ReceivedFrame>, ClientError>
    where
        F: FnMut(&NodePublic, &[u8]),
    {
        const RECV_PACKET: u8 = FrameType::RecvPacket.as_u8();
        loop {
            let mut delivered = false;
            while let Some((typ, len)) = complete_frame(&self.buf, MAX_FRAME_SIZE)? {
                if typ == RECV_PACKET && (KEY_LEN..=KEY_LEN + MAX_PACKET_SIZE).contains(&len) {
                    let frame = &self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
                    let (src, data) = frame.split_at(KEY_LEN);
                    let mut key = [0u8; KEY_LEN];
                    key.copy_from_slice(src);
                    on_packet(&NodePublic::from_bytes(key), data);
                    self.buf.advance(FRAME_HEADER_LEN + len);
                    delivered = true;
                    continue;
                }
                // Anything else (including a malformed RecvPacket, which `decode` rejects).
                self.buf.advance(FRAME_HEADER_LEN);
                let payload = self.buf.split_to(len).freeze();
                if let Some(f) = self.decode(typ, payload)? {
                    return Ok(Some(f));
                }
            }
            if delivered {
                return Ok(None);
            }
            fill(&mut self.rd, &mut self.buf).await?;
        }
    }

    /// Decodes one frame; `None` for ServerKey (skipped).
    fn decode(&self, typ: u8, payload: Bytes) -> Result<Option<ReceivedFrame>, ClientError> {
        if typ == FrameType::ServerKey.as_u8() {
            return Ok(None);
        }
        if typ == FrameType::ServerInfo.as_u8() {
            let info = open_server_info(&self.private_key, &self.server_key, &payload)?;
            return Ok(Some(ReceivedFrame::ServerInfo(info)));
        }
        Ok(Some(match Frame::decode(typ, payload)? {
            Frame::RecvPacket { src, packet } => ReceivedFrame::Packet { src, data: packet },
            Frame::PeerGone { peer, reason } => ReceivedFrame::PeerGone { key: peer, reason },
            Frame::PeerPresent { peer, addr, flags } => ReceivedFrame::PeerPresent {
                key: peer,
                addr,
                flags,
            },
            Frame::KeepAlive => ReceivedFrame::KeepAlive,
            Frame::Ping { data } => ReceivedFrame::Ping(data),
            Frame::Pong { data } => ReceivedFrame::Pong(data),
            Frame::Health { problem } => {
                ReceivedFrame::Health(String::from_utf8_lossy(&problem).into_owned())
            }
            Frame::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => ReceivedFrame::Restarting {
                reconnect_in: Duration::from_millis(u64::from(reconnect_in_ms)),
                try_for: Duration::from_millis(u64::from(try_for_ms)),
            },
            other => {
                let mut b = BytesMut::with_capacity(other.encoded_len());
                other.encode(&mut b);
                b.advance(FRAME_HEADER_LEN);
                ReceivedFrame::Unknown {
                    typ,
                    payload: b.freeze(),
                }
            }
        }))
    }

    /// The server's public key.
    pub fn server_public_key(&self) -> NodePublic {
        self.server_key
    }
}

impl ClientWriter {
    fn put_frame(&mut self, typ: u8, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.buf.reserve(FRAME_HEADER_LEN + len);
        let header = FrameHeader {
            typ,
            len: u32::try_from(len).unwrap_or(u32::MAX),
        };
        self.buf.extend_from_slice(&header.encode());
        for p in parts {
            self.buf.extend_from_slice(p);
        }
    }

    /// Appends a SendPacket to the write buffer without writing (see [`flush`](Self::flush));
    /// lets load generators batch many packets per syscall.
    pub fn buffer_packet(&mut self, dst: NodePublic, data: &[u8]) -> Result<(), ClientError> {
        if data.len() > MAX_PACKET_SIZE {
            return Err(ClientError::PacketTooLarge(data.len()));
        }
        self.put_frame(FrameType::SendPacket.as_u8(), &[dst.as_bytes(), data]);
        Ok(())
    }

    /// Bytes buffered by [`buffer_packet`](Self::buffer_packet) and not yet flushed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Writes everything buffered (one `write` when the transport takes it all) and flushes
    /// the transport. The buffer is kept for the next frames: no allocation per flush.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        // Counts only what was written, so a cancelled flush never writes a byte twice.
        while self.written < self.buf.len() {
            let n = self.wr.write(&self.buf[self.written..]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        self.wr.flush().await?;
        Ok(())
    }

    /// Sends one packet to `dst`.
    pub async fn send_packet(&mut self, dst: NodePublic, data: &[u8]) -> Result<(), ClientError> {
        self.buffer_packet(dst, data)?;
        self.flush().await
    }

    /// Sends Ping with `data`; the server answers Pong with the same bytes.
    pub async fn ping(&mut self, data: [u8; 8]) -> Result<(), ClientError> {
        self.put_frame(FrameType::Ping.as_u8(), &[&data]);
        self.flush().await
    }

    /// Sends Pong (reply to a server Ping).
    pub async fn pong(&mut self, data: [u8; 8]) -> Result<(), ClientError> {
        self.put_frame(FrameType::Pong.as_u8(), &[&data]);
        self.flush().await
    }

    /// Tells the server whether it is our home region.
    pub async fn note_preferred(&mut self, preferred: bool) -> Result<(), ClientError> {
        self.put_frame(FrameType::NotePreferred.as_u8(), &[&[u8::from(preferred)]]);
        self.flush().await
    }

    /// Mesh only: subscribe to PeerPresent/PeerGone.
    pub async fn watch_conns(&mut self) -> Result<(), ClientError> {
        self.put_frame(FrameType::WatchConns.as_u8(), &[]);
        self.flush().await
    }

    /// Mesh only: close every connection of `key` on the server.
    pub async fn close_peer(&mut self, key: NodePublic) -> Result<(), ClientError> {
        self.put_frame(FrameType::ClosePeer.as_u8(), &[key.as_bytes()]);
        self.flush().await
    }

    /// Mesh only: deliver `data` from `src` to the server's local client `dst`.
    pub async fn forward_packet(
        &mut self,
        src: NodePublic,
        dst: NodePublic,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.buffer_forward_packet(src, dst, data)?;
        self.flush().await
    }

    /// Appends a ForwardPacket to the write buffer without writing (see
    /// [`flush`](Self::flush)); mesh links batch the packets waiting in their queue.
    pub fn buffer_forward_packet(
        &mut self,
        src: NodePublic,
        dst: NodePublic,
        data: &[u8],
    ) -> Result<(), ClientError> {
        if data.len() > MAX_PACKET_SIZE {
            return Err(ClientError::PacketTooLarge(data.len()));
        }
        self.put_frame(
            FrameType::ForwardPacket.as_u8(),
            &[src.as_bytes(), dst.as_bytes(), data],
        );
        Ok(())
    }

    /// Sends an arbitrary frame (for testing the server's handling of bad input).
    pub async fn send_raw_frame(&mut self, typ: u8, payload: &[u8]) -> Result<(), ClientError> {
        self.put_frame(typ, &[payload]);
        self.flush().await
    }

    /// Writes raw bytes (not framed) — for tests that send garbage or partial frames.
    pub async fn send_raw_bytes(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.flush().await?;
        self.wr.write_all(bytes).await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// Shuts down the write side of the transport.
    pub async fn shutdown(&mut self) -> Result<(), ClientError> {
        self.flush().await?;
        self.wr.shutdown().await?;
        Ok(())
    }
}

const _: () = assert!(KEY_LEN == 32);

#[cfg(test)]
mod tests {

    use super::*;
    use proto::derp::{encode_recv_packet, server_key_frame};
    use tokio::io::DuplexStream;

    fn key(b: u8) -> NodePublic {
        NodePublic::from_bytes([b; KEY_LEN])
    }

    /// A client over an in-memory pipe whose far end the test writes as the server.
    async fn client(pipe: usize) -> (Client, DuplexStream) {
        let (a, mut b) = tokio::io::duplex(pipe);
        let server = NodePrivate::generate(&mut rand::thread_rng());
        b.write_all(&server_key_frame(&server.public()))
            .await
            .unwrap();
        let c = Client::handshake(
            a,
            Bytes::new(),
            NodePrivate::generate(&mut rand::thread_rng()),
            ClientOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(c.server_public_key(), server.public());
        // Drain the ClientInfo frame so the pipe never fills up in the client's direction.
        let mut hdr = [0u8; FRAME_HEADER_LEN];
        b.read_exact(&mut hdr).await.unwrap();
        let h = FrameHeader::decode(&hdr).unwrap();
        assert_eq!(h.typ, FrameType::ClientInfo.as_u8());
        let mut rest = vec![0u8; h.payload_len()];
        b.read_exact(&mut rest).await.unwrap();
        (c, b)
    }

    fn frame(typ: FrameType, payload: &[u8]) -> Vec<u8> {
        let mut v = FrameHeader::new(typ, payload.len() as u32)
            .encode()
            .to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[tokio::test]
    async fn recv_packets_delivers_every_buffered_packet_in_order() {
        let (mut c, mut srv) = client(1 << 20).await;
        let mut bytes = BytesMut::new();
        for i in 0..100u32 {
            encode_recv_packet(&mut bytes, &key(1), &[i as u8; 1400]);
        }
        // A KeepAlive after the packets ends the batch and is returned.
        bytes.extend_from_slice(&frame(FrameType::KeepAlive, &[]));
        srv.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        loop {
            let r = c
                .recv_packets(|src, data| {
                    assert_eq!(*src, key(1));
                    assert_eq!(data.len(), 1400);
                    got.push(data[0]);
                })
                .await
                .unwrap();
            if let Some(f) = r {
                assert_eq!(f, ReceivedFrame::KeepAlive);
                break;
            }
        }
        assert_eq!(got, (0..100u32).map(|i| i as u8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn recv_packets_reassembles_frames_split_across_reads() {
        let (mut c, mut srv) = client(1 << 20).await;
        let mut bytes = BytesMut::new();
        for i in 0..20u8 {
            encode_recv_packet(&mut bytes, &key(2), &vec![i; 100 + 700 * usize::from(i)]);
        }
        let writer = tokio::spawn(async move {
            // Dribble the bytes out in odd-sized pieces.
            for chunk in bytes.chunks(977) {
                srv.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            srv
        });
        let mut got = Vec::new();
        while got.len() < 20 {
            let r = c
                .recv_packets(|_, data| {
                    assert!(data.iter().all(|b| *b == data[0]));
                    got.push((data[0], data.len()));
                })
                .await
                .unwrap();
            assert!(r.is_none());
        }
        let want: Vec<_> = (0..20u8).map(|i| (i, 100 + 700 * usize::from(i))).collect();
        assert_eq!(got, want);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn recv_and_recv_packets_interleave() {
        let (mut c, mut srv) = client(1 << 20).await;
        let mut bytes = BytesMut::new();
        encode_recv_packet(&mut bytes, &key(3), b"one");
        bytes.extend_from_slice(&frame(FrameType::Pong, &[7; 8]));
        encode_recv_packet(&mut bytes, &key(4), b"two");
        // A ServerKey after the handshake is skipped by both.
        let server = NodePrivate::generate(&mut rand::thread_rng());
        bytes.extend_from_slice(&server_key_frame(&server.public()));
        encode_recv_packet(&mut bytes, &key(5), b"three");
        srv.write_all(&bytes).await.unwrap();
        assert_eq!(
            c.recv().await.unwrap(),
            ReceivedFrame::Packet {
                src: key(3),
                data: Bytes::from_static(b"one")
            }
        );
        let mut got = Vec::new();
        let r = c
            .recv_packets(|s, d| got.push((*s, d.to_vec())))
            .await
            .unwrap();
        assert_eq!(r, Some(ReceivedFrame::Pong([7; 8])));
        assert!(got.is_empty());
        let r = c
            .recv_packets(|s, d| got.push((*s, d.to_vec())))
            .await
            .unwrap();
        assert_eq!(r, None);
        assert_eq!(
            got,
            vec![(key(4), b"two".to_vec()), (key(5), b"three".to_vec())]
        );
    }

    #[tokio::test]
    async fn malformed_packet_from_server_is_a_clear_error() {
        let (mut c, mut srv) = client(1 << 16).await;
        let mut bytes = BytesMut::new();
        encode_recv_packet(&mut bytes, &key(6), b"ok");
        // RecvPacket shorter than a key.
        bytes.extend_from_slice(&frame(FrameType::RecvPacket, &[1; 10]));
        srv.write_all(&bytes).await.unwrap();
        let mut n = 0;
        let err = loop {
            match c.recv_packets(|_, _| n += 1).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(n, 1, "the packet before the bad frame is delivered");
        assert!(
            matches!(err, ClientError::Frame(FrameError::TooShort { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("too short"), "{err}");
    }

    #[tokio::test]
    async fn oversized_frame_from_server_is_an_error_before_buffering_it() {
        let (mut c, mut srv) = client(1 << 16).await;
        let hdr = FrameHeader::new(FrameType::RecvPacket, (MAX_FRAME_SIZE + 1) as u32).encode();
        srv.write_all(&hdr).await.unwrap();
        let err = c.recv_packets(|_, _| {}).await.unwrap_err();
        assert!(matches!(err, ClientError::FrameTooLarge(n) if n == MAX_FRAME_SIZE + 1));
        let (mut c, mut srv) = client(1 << 16).await;
        srv.write_all(&hdr).await.unwrap();
        let err = c.recv().await.unwrap_err();
        assert!(matches!(err, ClientError::FrameTooLarge(_)), "{err}");
    }

    #[tokio::test]
    async fn closed_mid_frame_is_closed() {
        let (mut c, mut srv) = client(1 << 16).await;
        let mut bytes = BytesMut::new();
        encode_recv_packet(&mut bytes, &key(7), &[0; 500]);
        srv.write_all(&bytes[..200]).await.unwrap();
        drop(srv);
        let err = c.recv_packets(|_, _| {}).await.unwrap_err();
        assert!(matches!(err, ClientError::Closed), "{err}");
    }

    #[tokio::test]
    async fn large_frame_is_read_whole() {
        // A frame bigger than READ_CHUNK (a 64 KiB packet) arrives intact.
        let (mut c, mut srv) = client(1 << 20).await;
        let mut bytes = BytesMut::new();
        encode_recv_packet(&mut bytes, &key(8), &vec![9u8; MAX_PACKET_SIZE]);
        let w = tokio::spawn(async move {
            srv.write_all(&bytes).await.unwrap();
            srv
        });
        let mut len = 0;
        assert!(c
            .recv_packets(|_, d| len = d.len())
            .await
            .unwrap()
            .is_none());
        assert_eq!(len, MAX_PACKET_SIZE);
        drop(w.await.unwrap());
    }

    #[tokio::test]
    async fn flush_writes_one_batch_and_reuses_the_buffer() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (rd, wr) = tokio::io::split(a);
        let server = NodePrivate::generate(&mut rand::thread_rng());
        let opts = ClientOptions {
            server_key: Some(server.public()),
            ..Default::default()
        };
        let c = Client::handshake_split(
            rd,
            wr,
            Bytes::new(),
            NodePrivate::generate(&mut rand::thread_rng()),
            opts,
        )
        .await
        .unwrap();
        let (_r, mut w) = c.split();
        let mut hdr = [0u8; FRAME_HEADER_LEN];
        b.read_exact(&mut hdr).await.unwrap();
        let mut ci = vec![0u8; FrameHeader::decode(&hdr).unwrap().payload_len()];
        b.read_exact(&mut ci).await.unwrap();
        let mut cap = 0;
        for round in 0..3u8 {
            for i in 0..32u8 {
                w.buffer_packet(key(i), &[round; 1400]).unwrap();
            }
            assert_eq!(w.buffered(), 32 * (FRAME_HEADER_LEN + KEY_LEN + 1400));
            w.flush().await.unwrap();
            assert_eq!(w.buffered(), 0);
            if round > 0 {
                assert!(w.buf.capacity() >= cap, "buffer kept across flushes");
            }
            cap = w.buf.capacity();
            let mut got = vec![0u8; 32 * (FRAME_HEADER_LEN + KEY_LEN + 1400)];
            b.read_exact(&mut got).await.unwrap();
            let mut off = 0;
            for i in 0..32u8 {
                let h = FrameHeader::decode(&got[off..]).unwrap();
                assert_eq!(h.typ, FrameType::SendPacket.as_u8());
                assert_eq!(h.payload_len(), KEY_LEN + 1400);
                let p = &got[off + FRAME_HEADER_LEN..off + FRAME_HEADER_LEN + h.payload_len()];
                assert_eq!(&p[..KEY_LEN], key(i).as_bytes());
                assert!(p[KEY_LEN..].iter().all(|x| *x == round));
                off += FRAME_HEADER_LEN + h.payload_len();
            }
        }
        assert!(w
            .buffer_packet(key(1), &vec![0; MAX_PACKET_SIZE + 1])
            .is_err());
    }
}
