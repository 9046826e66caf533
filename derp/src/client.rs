//! A DERP client over any byte stream that is already past HTTP (TCP after the 101, TLS, or a
//! WebSocket byte stream): our tests, load generator and (later) mesh links use it.
//!
//! Why it looks like Go's `derp.Client`: the handshake reads ServerKey (unless the key is
//! already known, e.g. from the TLS meta cert), sends ClientInfo and returns immediately — it
//! does not wait for ServerInfo, which arrives through [`Client::recv`] like every other frame.
//! The client splits into a [`ClientReader`] and a [`ClientWriter`] so a caller can send and
//! receive concurrently.
//!
//! Must never: buffer a frame larger than 1 MiB (that is an error, as in Go), send a packet
//! larger than 64 KiB, or panic on anything the server sends.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use proto::derp::{
    client_info_frame, open_server_info, parse_server_key, ClientInfo, Frame, FrameError,
    FrameHeader, FrameType, HandshakeError, PeerGoneReason, PeerPresentFlags, ServerInfo,
    FRAME_HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE, MAX_PACKET_SIZE, MAX_SERVER_KEY_LEN,
    PROTOCOL_VERSION,
};
use proto::key::{MeshKey, NodePrivate, NodePublic};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

/// Object-safe alias for the transports a client can run over.
pub trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientIo for T {}

type BoxIo = Box<dyn ClientIo>;

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
    rd: ReadHalf<BoxIo>,
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
    wr: WriteHalf<BoxIo>,
    buf: BytesMut,
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

async fn read_frame_into(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    max: usize,
) -> Result<(u8, Bytes), ClientError> {
    loop {
        if let Some(h) = FrameHeader::decode(buf) {
            let len = h.payload_len();
            if len > max {
                return Err(ClientError::FrameTooLarge(len));
            }
            if buf.len() >= FRAME_HEADER_LEN + len {
                buf.advance(FRAME_HEADER_LEN);
                let payload = buf.split_to(len).freeze();
                return Ok((h.typ, payload));
            }
            buf.reserve(FRAME_HEADER_LEN + len - buf.len());
        } else {
            buf.reserve(4096);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(ClientError::Closed);
        }
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
        let mut io: BoxIo = Box::new(io);
        let mut buf = BytesMut::from(&leftover[..]);
        let server_key = match opts.server_key {
            Some(k) => k,
            None => {
                let (typ, payload) = read_frame_into(&mut io, &mut buf, MAX_SERVER_KEY_LEN).await?;
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
        io.write_all(&frame).await?;
        io.flush().await?;
        let public_key = private_key.public();
        let (rd, wr) = tokio::io::split(io);
        Ok(Client {
            reader: ClientReader {
                rd,
                buf,
                private_key,
                server_key,
            },
            writer: ClientWriter {
                wr,
                buf: BytesMut::new(),
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
            let (typ, payload) =
                read_frame_into(&mut self.rd, &mut self.buf, MAX_FRAME_SIZE).await?;
            if typ == FrameType::ServerKey.as_u8() {
                continue;
            }
            if typ == FrameType::ServerInfo.as_u8() {
                let info = open_server_info(&self.private_key, &self.server_key, &payload)?;
                return Ok(ReceivedFrame::ServerInfo(info));
            }
            return Ok(match Frame::decode(typ, payload)? {
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
            });
        }
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
        self.buf.put_u8(typ);
        self.buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        for p in parts {
            self.buf.put_slice(p);
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
        self.buf.len()
    }

    /// Writes everything buffered and flushes the transport.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.buf.is_empty() {
            let b = self.buf.split();
            self.wr.write_all(&b).await?;
        }
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
        if data.len() > MAX_PACKET_SIZE {
            return Err(ClientError::PacketTooLarge(data.len()));
        }
        self.put_frame(
            FrameType::ForwardPacket.as_u8(),
            &[src.as_bytes(), dst.as_bytes(), data],
        );
        self.flush().await
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
