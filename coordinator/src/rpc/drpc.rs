//! dRPC over yamux streams with storj drpc v0.0.34 semantics: the server side (one dRPC
//! connection per accepted yamux stream, dispatching invokes to a [`Handler`]) and the client side
//! ([`RpcClient`], one yamux stream per call, exactly Go's call patterns).
//!
//! Why: Coder's agents and clients run `drpcconn`/`drpcserver` over yamux; the byte-level rules
//! (ids, kinds, half-close, error bodies, 4 MiB packets) must match or Go peers break. Frame and
//! packet rules live in `proto::drpc`; this module owns the connection state machine.
//!
//! Per transport (yamux stream) the server runs one task that reads packets through
//! `proto::drpc::PacketAssembler` and polls the active handler future in the same `select!`.
//! Outgoing packets need no task: senders number, encode and write them straight into the yamux
//! stream through a shared `TransportWriter` (one packet in flight, back-pressure by the yamux send
//! window, as Go's `drpcwire.Writer`). Handlers are cancelled by
//! dropping their future (a new Invoke with a higher stream id, a Cancel, or the transport ending),
//! so **handlers must be cancel-safe**; they can also watch [`RpcStream::cancelled`].
//!
//! Unknown methods get an Error packet with code 12 (`UNIMPLEMENTED`) and drpcmux's text
//! `protocol error: unknown rpc: "<name>"`, so Coder clients recognise them either way. A later
//! upstream proxy can take over a whole transport through [`Handler::take_over`], which receives
//! the raw bytes already consumed (the Invoke) and both stream halves.
//!
//! This module must never buffer more than one packet (≤ 4 MiB) plus one read chunk per
//! transport, never let one transport's protocol error affect another (it resets only its own
//! yamux stream, logs and counts), and never hold a lock across `.await`. What it holds for a
//! peer (the read buffer, the partial packet, the raw prefix, every message until its call takes
//! it) is charged to the yamux session's buffered-bytes limit through
//! [`super::yamux::HeldBytes`], so that the session's streams together stay under it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use proto::drpc::{
    decode_error, decode_metadata, encode_error, encode_packet_with, unknown_rpc_message,
    DrpcError, Frame, Kind, Packet, PacketAssembler, MAX_PACKET_SIZE, UNIMPLEMENTED,
};
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::yamux::{
    HeldBytes, Session, SessionError, SessionHandle, Stream, StreamReader, StreamWriter,
};
use super::{count, MetricsRef};

/// How much room we reserve per read. Small on purpose: a coordination session idles between
/// updates of a few hundred bytes, and this buffer lives as long as the session (10,000 sessions ×
/// 64 KiB was most of the coordinator's memory); a large packet simply takes several reads.
const READ_CHUNK: usize = 8 * 1024;
/// Raw bytes kept for [`Handler::take_over`] before the first dispatch (Invoke + metadata).
const MAX_RAW_PREFIX: usize = 2 * MAX_PACKET_SIZE + 128 * 1024;

/// Errors seen by handlers and clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// An application error: sent to / received from the peer as an Error packet.
    #[error("{message}")]
    Remote {
        /// drpcerr code (0 = none, 12 = unimplemented).
        code: u64,
        /// Error text.
        message: String,
    },
    /// The stream was closed (by us or the peer) and can't carry this operation.
    #[error("drpc: stream closed")]
    Closed,
    /// The call was cancelled (peer Cancel/Close, superseded by a new Invoke, transport gone).
    #[error("drpc: canceled")]
    Canceled,
    /// A message larger than the 4 MiB packet limit.
    #[error("drpc: message of {0} bytes exceeds the 4 MiB packet limit")]
    TooLarge(usize),
    /// A message did not decode as the expected protobuf type.
    #[error("drpc: decode: {0}")]
    Decode(String),
    /// The peer broke the dRPC protocol; the transport was closed.
    #[error("drpc: protocol error: {0}")]
    Protocol(String),
    /// The yamux stream or session failed.
    #[error("drpc: transport: {0}")]
    Transport(String),
}

impl RpcError {
    /// An application error with a code.
    pub fn new(code: u64, message: impl Into<String>) -> Self {
        RpcError::Remote {
            code,
            message: message.into(),
        }
    }

    /// The error a server sends for an unknown method (code 12 + drpcmux's text).
    pub fn unimplemented(method: &str) -> Self {
        RpcError::new(UNIMPLEMENTED, unknown_rpc_message(method))
    }

    /// The code sent in an Error packet for this error.
    pub fn code(&self) -> u64 {
        match self {
            RpcError::Remote { code, .. } => *code,
            _ => 0,
        }
    }

    /// Coder's `IsDRPCUnimplementedError`: code 12 or text containing `unknown rpc: `.
    pub fn is_unimplemented(&self) -> bool {
        match self {
            RpcError::Remote { code, message } => proto::drpc::is_unimplemented(*code, message),
            _ => false,
        }
    }
}

/// A running call.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<(), RpcError>> + Send + 'static>>;
/// A transport taken over by [`Handler::take_over`].
pub type TakeOverFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A transport handed to [`Handler::take_over`] before any reply was written.
pub struct RawInvoke {
    /// The method named by the first Invoke.
    pub method: String,
    /// Metadata from an InvokeMetadata packet with the same stream id, if any.
    pub metadata: BTreeMap<String, String>,
    /// Every byte read from the transport so far, verbatim (InvokeMetadata, Invoke and any
    /// read-ahead of later frames). Replaying these to an upstream transport and then copying both
    /// directions forwards the call byte for byte.
    pub consumed: Bytes,
    /// Read half of the yamux stream (positioned after `consumed`).
    pub reader: StreamReader,
    /// Write half of the yamux stream (nothing written yet).
    pub writer: StreamWriter,
}

impl std::fmt::Debug for RawInvoke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawInvoke")
            .field("method", &self.method)
            .field("consumed", &self.consumed.len())
            .finish_non_exhaustive()
    }
}

/// Serves dRPC methods. One value serves every transport of every session.
pub trait Handler: Send + Sync + 'static {
    /// Starts `method` on `stream`. Returns `None` if the method is unknown; the server then
    /// replies with [`RpcError::unimplemented`]. `Ok(())` from the future ends the call with
    /// CloseSend (unless the handler already closed), `Err(e)` with an Error packet.
    fn call(self: Arc<Self>, method: &str, stream: RpcStream) -> Option<CallFuture>;

    /// Offered the raw transport when its *first* Invoke arrives, before [`Handler::call`]. Return
    /// `Err(raw)` (the default) to decline; `Ok(fut)` runs `fut` as the whole transport.
    fn take_over(self: Arc<Self>, raw: Box<RawInvoke>) -> Result<TakeOverFuture, Box<RawInvoke>> {
        Err(raw)
    }
}

/// Settings for dRPC connections.
#[derive(Debug, Clone)]
pub struct DrpcConfig {
    /// Messages queued towards a handler's `recv` before we stop reading the transport.
    pub recv_queue: usize,
    /// Where to count protocol errors, unknown methods and calls.
    pub metrics: MetricsRef,
}

impl Default for DrpcConfig {
    fn default() -> Self {
        DrpcConfig {
            recv_queue: 4,
            metrics: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stream state shared between a call's handle and its connection
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Flags {
    send_closed: bool,
    recv_closed: bool,
    terminated: bool,
}

struct CallShared {
    flags: Mutex<Flags>,
    cancel: CancellationToken,
}

impl CallShared {
    fn new() -> Arc<Self> {
        Arc::new(CallShared {
            flags: Mutex::new(Flags::default()),
            cancel: CancellationToken::new(),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut Flags) -> R) -> R {
        let mut g = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    fn terminate(&self) {
        self.with(|f| {
            f.terminated = true;
            f.send_closed = true;
            f.recv_closed = true;
        });
        self.cancel.cancel();
    }

    fn is_terminated(&self) -> bool {
        self.with(|f| f.terminated)
    }
}

enum Inbound {
    /// A message and its charge against the session's buffered-bytes limit, given back when the
    /// call takes it.
    Message(Bytes, HeldBytes),
    End,
    Error(RpcError),
}

/// Sending side of a call. Cloneable.
#[derive(Clone)]
pub struct RpcSender {
    stream_id: u64,
    out: Arc<TransportWriter>,
    shared: Arc<CallShared>,
}

impl std::fmt::Debug for RpcSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcSender")
            .field("stream_id", &self.stream_id)
            .finish_non_exhaustive()
    }
}

impl RpcSender {
    async fn write(&self, kind: Kind, control: bool, body: Bytes) -> Result<(), RpcError> {
        self.out
            .send(OutPacket {
                stream_id: self.stream_id,
                kind,
                control,
                body,
            })
            .await
    }

    /// Sends one message (split into ≤ 64 KiB frames) and waits until it is written.
    pub async fn send(&self, msg: Bytes) -> Result<(), RpcError> {
        if msg.len() > MAX_PACKET_SIZE {
            return Err(RpcError::TooLarge(msg.len()));
        }
        let closed = self.shared.with(|f| f.send_closed || f.terminated);
        if closed {
            return Err(if self.shared.cancel.is_cancelled() {
                RpcError::Canceled
            } else {
                RpcError::Closed
            });
        }
        self.write(Kind::Message, false, msg).await
    }

    /// Encodes and sends a protobuf message.
    pub async fn send_msg<M: prost::Message>(&self, msg: &M) -> Result<(), RpcError> {
        self.send(Bytes::from(msg.encode_to_vec())).await
    }

    /// Half-closes: no more messages from us (CloseSend). No-op if already closed.
    pub async fn close_send(&self) -> Result<(), RpcError> {
        let send = self.shared.with(|f| {
            if f.send_closed || f.terminated {
                return false;
            }
            f.send_closed = true;
            if f.recv_closed {
                f.terminated = true;
            }
            true
        });
        if !send {
            return Ok(());
        }
        self.write(Kind::CloseSend, false, Bytes::new()).await
    }

    /// Terminates the stream in both directions (Close). No-op if already terminated.
    pub async fn close(&self) -> Result<(), RpcError> {
        if !self.terminate_first() {
            return Ok(());
        }
        self.write(Kind::Close, false, Bytes::new()).await
    }

    /// Terminates the stream with an Error packet (8-byte code + text). No-op if terminated.
    pub async fn send_error(&self, code: u64, text: &str) -> Result<(), RpcError> {
        if !self.terminate_first() {
            return Ok(());
        }
        self.write(Kind::Error, false, encode_error(code, text))
            .await
    }

    fn terminate_first(&self) -> bool {
        self.shared.with(|f| {
            if f.terminated {
                return false;
            }
            f.terminated = true;
            f.send_closed = true;
            f.recv_closed = true;
            true
        })
    }

    /// Resolves when the call is cancelled or terminated by the peer or the transport.
    pub async fn cancelled(&self) {
        self.shared.cancel.cancelled().await
    }
}

/// Receiving side of a call.
pub struct RpcReceiver {
    rx: mpsc::Receiver<Inbound>,
    shared: Arc<CallShared>,
    done: bool,
}

impl std::fmt::Debug for RpcReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcReceiver")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl RpcReceiver {
    /// The next message body; `None` once the peer sent CloseSend or Close. A peer Error packet
    /// is returned as [`RpcError::Remote`]. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, RpcError> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(Inbound::Message(b, _held)) => Ok(Some(b)),
            Some(Inbound::End) => {
                self.done = true;
                Ok(None)
            }
            Some(Inbound::Error(e)) => {
                self.done = true;
                Err(e)
            }
            None => {
                self.done = true;
                if self.shared.is_terminated() {
                    Ok(None)
                } else {
                    Err(RpcError::Canceled)
                }
            }
        }
    }

    /// Receives and decodes one protobuf message.
    pub async fn recv_msg<M: prost::Message + Default>(&mut self) -> Result<Option<M>, RpcError> {
        match self.recv().await? {
            Some(b) => M::decode(b)
                .map(Some)
                .map_err(|e| RpcError::Decode(e.to_string())),
            None => Ok(None),
        }
    }
}

/// One dRPC call (server side: handed to [`Handler::call`]; client side: from
/// [`RpcClient::open_stream`]). Use [`RpcStream::split`] to send and receive from different tasks.
pub struct RpcStream {
    method: String,
    metadata: BTreeMap<String, String>,
    tx: RpcSender,
    rx: RpcReceiver,
    /// Client side: dropping the stream ends the transport.
    _client_guard: Option<ClientGuard>,
}

impl std::fmt::Debug for RpcStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcStream")
            .field("method", &self.method)
            .field("stream_id", &self.tx.stream_id)
            .finish_non_exhaustive()
    }
}

struct ClientGuard(CancellationToken);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl RpcStream {
    /// The full method name, e.g. `/coder.tailnet.v2.Tailnet/Coordinate`.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// InvokeMetadata sent with the call (empty for Coder's clients).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// See [`RpcReceiver::recv`].
    pub async fn recv(&mut self) -> Result<Option<Bytes>, RpcError> {
        self.rx.recv().await
    }

    /// See [`RpcReceiver::recv_msg`].
    pub async fn recv_msg<M: prost::Message + Default>(&mut self) -> Result<Option<M>, RpcError> {
        self.rx.recv_msg().await
    }

    /// See [`RpcSender::send`].
    pub async fn send(&self, msg: Bytes) -> Result<(), RpcError> {
        self.tx.send(msg).await
    }

    /// See [`RpcSender::send_msg`].
    pub async fn send_msg<M: prost::Message>(&self, msg: &M) -> Result<(), RpcError> {
        self.tx.send_msg(msg).await
    }

    /// See [`RpcSender::close_send`].
    pub async fn close_send(&self) -> Result<(), RpcError> {
        self.tx.close_send().await
    }

    /// See [`RpcSender::close`].
    pub async fn close(&self) -> Result<(), RpcError> {
        self.tx.close().await
    }

    /// See [`RpcSender::send_error`].
    pub async fn send_error(&self, code: u64, text: &str) -> Result<(), RpcError> {
        self.tx.send_error(code, text).await
    }

    /// See [`RpcSender::cancelled`].
    pub async fn cancelled(&self) {
        self.tx.cancelled().await
    }

    /// A cloneable sender for this call.
    pub fn sender(&self) -> RpcSender {
        self.tx.clone()
    }

    /// Splits into a cloneable sender and the receiver. On the client side the transport stays
    /// open until the receiver is dropped (it owns the transport guard).
    pub fn split(self) -> (RpcSender, RpcReceiverOwned) {
        (
            self.tx,
            RpcReceiverOwned {
                rx: self.rx,
                _client_guard: self._client_guard,
            },
        )
    }
}

/// The receiver returned by [`RpcStream::split`] (keeps a client transport alive).
pub struct RpcReceiverOwned {
    rx: RpcReceiver,
    _client_guard: Option<ClientGuard>,
}

impl std::fmt::Debug for RpcReceiverOwned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.rx.fmt(f)
    }
}

impl std::ops::Deref for RpcReceiverOwned {
    type Target = RpcReceiver;
    fn deref(&self) -> &RpcReceiver {
        &self.rx
    }
}

impl std::ops::DerefMut for RpcReceiverOwned {
    fn deref_mut(&mut self) -> &mut RpcReceiver {
        &mut self.rx
    }
}

// ---------------------------------------------------------------------------------------------
// Transport plumbing shared by both sides
// ---------------------------------------------------------------------------------------------

/// Reads packets off one yamux stream. Cancel-safe: `next` only awaits inside `read_buf`.
struct PacketReader {
    rd: StreamReader,
    buf: BytesMut,
    asm: PacketAssembler,
    raw: Option<BytesMut>,
    /// `buf`, the partial packet in `asm` and `raw`, charged to the session.
    held: HeldBytes,
}

enum ReadError {
    Eof,
    Io(std::io::Error),
    Protocol(DrpcError),
}

impl PacketReader {
    fn new(rd: StreamReader, keep_raw: bool) -> Self {
        let held = rd.held_bytes();
        PacketReader {
            rd,
            buf: BytesMut::with_capacity(READ_CHUNK),
            asm: PacketAssembler::new(),
            raw: keep_raw.then(BytesMut::new),
            held,
        }
    }

    /// Charges what this reader holds now to the session (the read buffer's whole capacity, so
    /// that an idle stream costs its reserved chunk too); `Err` once that is over its limit (the
    /// session has been ended).
    fn account(&mut self) -> Result<(), ReadError> {
        let now =
            self.buf.capacity() + self.asm.buffered() + self.raw.as_ref().map_or(0, |r| r.len());
        self.held.set(now).map_err(|e| {
            ReadError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                e.to_string(),
            ))
        })
    }

    /// The next packet if the bytes already read complete one (no I/O).
    fn next_buffered(&mut self) -> Result<Option<(Packet, HeldBytes)>, ReadError> {
        while let Some(frame) = Frame::decode(&mut self.buf).map_err(ReadError::Protocol)? {
            if let Some(p) = self.asm.push(frame).map_err(ReadError::Protocol)? {
                self.account()?;
                let held = self.held.split(p.data.len()).map_err(|e| {
                    ReadError::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        e.to_string(),
                    ))
                })?;
                return Ok(Some((p, held)));
            }
        }
        Ok(None)
    }

    /// The next packet, with its data's charge against the session's buffered-bytes limit.
    async fn next(&mut self) -> Result<(Packet, HeldBytes), ReadError> {
        loop {
            if let Some(p) = self.next_buffered()? {
                return Ok(p);
            }
            if self.buf.is_empty() && self.buf.capacity() > 2 * READ_CHUNK {
                // A large packet grew the buffer: give it back rather than keep it for the
                // stream's life (an idle session holds one small chunk, see `READ_CHUNK`).
                self.buf = BytesMut::with_capacity(READ_CHUNK);
            }
            self.account()?;
            self.buf.reserve(READ_CHUNK);
            let before = self.buf.len();
            let n = self
                .rd
                .read_buf(&mut self.buf)
                .await
                .map_err(ReadError::Io)?;
            if n == 0 {
                return Err(ReadError::Eof);
            }
            if let Some(raw) = self.raw.as_mut() {
                if raw.len() + n > MAX_RAW_PREFIX {
                    self.raw = None;
                } else {
                    raw.extend_from_slice(&self.buf[before..]);
                }
            }
            self.account()?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transport writer: packets written straight into the yamux stream
// ---------------------------------------------------------------------------------------------

/// Above this capacity the encode buffer is given back once drained (a 4 MiB message must not
/// keep a 4 MiB buffer for the transport's life).
const KEEP_WRITE_BUFFER: usize = 16 * 1024;

/// The write side of one transport, shared by every sender of its calls: numbers packets per dRPC
/// stream id (from 1), encodes each into one buffer and writes it straight into the yamux stream.
/// There is no writer task and no per-message acknowledgement: a send completes when the yamux
/// stream took the whole packet, so back-pressure is the yamux send window (as Go's
/// `drpcwire.Writer` blocks in `Write` on the stream). One packet is in flight at a time, so the
/// frames of two packets never interleave; whoever is polled next finishes a packet whose sender
/// was cancelled before it starts its own. The state sits under a short `std` mutex that is
/// never held across `.await` (every step is a poll).
struct TransportWriter {
    st: Mutex<WriteState>,
}

struct WriteState {
    /// `None` once reset, shut down or failed.
    wr: Option<StreamWriter>,
    /// The packet in flight (encoded), `buf[pos..]` not yet taken by the stream.
    buf: BytesMut,
    pos: usize,
    /// Sequence number of the packet in `buf`, of the last one fully written, of the next one.
    queued_seq: u64,
    written_seq: u64,
    next_seq: u64,
    cur_stream: u64,
    message_id: u64,
    /// No new packet is accepted (the transport is ending).
    closing: bool,
    /// Why every later send fails.
    failed: Option<RpcError>,
    /// Senders waiting for the packet in flight to drain (at most one entry per waiting sender).
    waiters: Vec<Waker>,
}

struct OutPacket {
    stream_id: u64,
    kind: Kind,
    control: bool,
    body: Bytes,
}

impl WriteState {
    fn wake_waiters(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }

    fn park(&mut self, cx: &Context<'_>) {
        if !self.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            self.waiters.push(cx.waker().clone());
        }
    }

    fn fail(&mut self, e: RpcError) -> RpcError {
        self.failed = Some(e.clone());
        self.wr = None;
        self.buf = BytesMut::new();
        self.pos = 0;
        self.wake_waiters();
        e
    }

    /// Writes the packet in flight; `Ready(Ok)` once `buf` is empty.
    fn poll_flush_packet(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        while self.pos < self.buf.len() {
            let Some(wr) = self.wr.as_mut() else {
                return Poll::Ready(Err(self.fail(RpcError::Closed)));
            };
            match Pin::new(wr).poll_write(cx, &self.buf[self.pos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(self.fail(RpcError::Transport("write zero".into()))));
                }
                Poll::Ready(Ok(n)) => self.pos += n,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(self.fail(RpcError::Transport(e.to_string()))));
                }
                Poll::Pending => {
                    self.park(cx);
                    return Poll::Pending;
                }
            }
        }
        if self.queued_seq != 0 {
            self.written_seq = self.queued_seq;
            self.queued_seq = 0;
            if self.buf.capacity() > KEEP_WRITE_BUFFER {
                self.buf = BytesMut::new();
            } else {
                self.buf.clear();
            }
            self.pos = 0;
            self.wake_waiters();
        }
        Poll::Ready(Ok(()))
    }
}

impl TransportWriter {
    fn new(wr: StreamWriter) -> Arc<Self> {
        Arc::new(TransportWriter {
            st: Mutex::new(WriteState {
                wr: Some(wr),
                buf: BytesMut::new(),
                pos: 0,
                queued_seq: 0,
                written_seq: 0,
                next_seq: 1,
                cur_stream: 0,
                message_id: 0,
                closing: false,
                failed: None,
                waiters: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriteState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        mine: &mut u64,
        pkt: &OutPacket,
    ) -> Poll<Result<(), RpcError>> {
        let mut g = self.lock();
        loop {
            if *mine != 0 && g.written_seq >= *mine {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &g.failed {
                return Poll::Ready(Err(e.clone()));
            }
            if g.pos < g.buf.len() {
                match g.poll_flush_packet(cx) {
                    Poll::Ready(Ok(())) => continue,
                    other => return other,
                }
            }
            if *mine != 0 {
                // Our packet left the buffer without being counted written: only a failure
                // does that, and `failed` is checked above.
                return Poll::Ready(Err(RpcError::Closed));
            }
            if g.closing {
                return Poll::Ready(Err(RpcError::Closed));
            }
            if pkt.stream_id < g.cur_stream {
                // A straggler from a superseded call: ids must never go backwards on the wire.
                return Poll::Ready(Err(RpcError::Canceled));
            }
            if pkt.stream_id != g.cur_stream {
                g.cur_stream = pkt.stream_id;
                g.message_id = 0;
            }
            g.message_id += 1;
            let (message_id, seq) = (g.message_id, g.next_seq);
            g.next_seq += 1;
            g.queued_seq = seq;
            g.pos = 0;
            encode_packet_with(
                pkt.stream_id,
                message_id,
                pkt.kind,
                pkt.control,
                &pkt.body,
                &mut g.buf,
            );
            *mine = seq;
        }
    }

    /// Writes one packet; resolves once the yamux stream took all of it.
    async fn send(&self, pkt: OutPacket) -> Result<(), RpcError> {
        let mut mine = 0u64;
        let guard = WakeOnDrop {
            writer: self,
            armed: true,
        };
        let res = std::future::poll_fn(|cx| self.poll_send(cx, &mut mine, &pkt)).await;
        let mut guard = guard;
        guard.armed = false;
        res
    }

    /// Ends the transport in order: refuses new packets, finishes the one in flight, then FIN.
    async fn finish(&self) {
        self.lock().closing = true;
        std::future::poll_fn(|cx| {
            let mut g = self.lock();
            if g.failed.is_some() {
                return Poll::Ready(());
            }
            match g.poll_flush_packet(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
            let Some(wr) = g.wr.as_mut() else {
                return Poll::Ready(());
            };
            match Pin::new(wr).poll_shutdown(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(_) => {
                    g.fail(RpcError::Closed);
                    Poll::Ready(())
                }
            }
        })
        .await
    }

    /// Ends the transport at once with RST (a protocol error): the packet in flight is dropped.
    async fn abort(&self) {
        let wr = {
            let mut g = self.lock();
            let wr = g.wr.take();
            g.fail(RpcError::Closed);
            wr
        };
        if let Some(wr) = wr {
            let _ = wr.reset().await;
        }
    }
}

/// A send cancelled while waiting may hold the only waker the yamux stream will wake: hand the
/// turn to the other waiting senders.
struct WakeOnDrop<'a> {
    writer: &'a TransportWriter,
    armed: bool,
}

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.writer.lock().wake_waiters();
        }
    }
}

fn log_protocol_error(metrics: &MetricsRef, stream: u32, err: &DrpcError) {
    count(metrics, |m| &m.drpc_protocol_errors);
    tracing::info!(yamux_stream = stream, error = %err, "drpc: protocol error, closing transport");
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// Accepts yamux streams on `session` and serves one dRPC connection on each until the session
/// ends; returns why it ended. Dropping the future stops every transport of this session.
pub async fn serve(
    mut session: Session,
    handler: Arc<dyn Handler>,
    config: DrpcConfig,
) -> SessionError {
    let config = Arc::new(config);
    let mut tasks = JoinSet::new();
    let end = loop {
        tokio::select! {
            s = session.accept() => match s {
                Ok(stream) => {
                    tasks.spawn(serve_stream(stream, handler.clone(), config.clone()));
                }
                Err(e) => break e,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    };
    tasks.shutdown().await;
    end
}

struct Current {
    stream_id: u64,
    shared: Arc<CallShared>,
    in_tx: mpsc::Sender<Inbound>,
    fut: Option<CallFuture>,
}

/// Serves one dRPC connection on one yamux stream until the peer closes it or breaks the protocol.
pub async fn serve_stream(stream: Stream, handler: Arc<dyn Handler>, config: Arc<DrpcConfig>) {
    let yamux_id = stream.id();
    let (rd, wr) = stream.into_split();
    let mut reader = PacketReader::new(rd, true);
    let mut writer: Option<StreamWriter> = Some(wr);
    let mut aborted = false;
    let mut out: Option<Arc<TransportWriter>> = None;
    let mut current: Option<Current> = None;
    let mut last_stream: u64 = 0;
    let mut meta: Option<(u64, BTreeMap<String, String>)> = None;
    let mut pending: Option<Inbound> = None;
    // A packet already parsed from the read buffer (see below), processed in its turn.
    let mut ahead: Option<(Packet, HeldBytes)> = None;

    loop {
        let running = current.as_ref().is_some_and(|c| c.fut.is_some());
        let deliver_to = current.as_ref().map(|c| c.in_tx.clone());
        tokio::select! {
            biased;
            res = async {
                match current.as_mut().and_then(|c| c.fut.as_mut()) {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            }, if running => {
                let sender = match current.as_mut() {
                    Some(c) => {
                        c.fut = None;
                        out.as_ref().map(|out| RpcSender {
                            stream_id: c.stream_id,
                            out: out.clone(),
                            shared: c.shared.clone(),
                        })
                    }
                    None => None,
                };
                finish_call(sender, res).await;
            }
            permit = async {
                match deliver_to.as_ref() {
                    Some(tx) => tx.reserve().await.ok(),
                    None => None,
                }
            }, if pending.is_some() => {
                if let (Some(p), Some(item)) = (permit, pending.take()) {
                    p.send(item);
                }
                // The call may answer as soon as it is polled, and its packets go straight to the
                // stream: a protocol error already in the read buffer must end the transport
                // before that (nothing is answered on a broken transport).
                if ahead.is_none() {
                    match reader.next_buffered() {
                        Ok(p) => ahead = p,
                        Err(ReadError::Protocol(e)) => {
                            log_protocol_error(&config.metrics, yamux_id, &e);
                            aborted = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            pkt = async {
                match ahead.take() {
                    Some(p) => Ok(p),
                    None => reader.next().await,
                }
            }, if pending.is_none() => {
                let (pkt, held) = match pkt {
                    Ok(p) => p,
                    Err(ReadError::Eof) => break,
                    Err(ReadError::Io(e)) => {
                        tracing::debug!(yamux_stream = yamux_id, error = %e, "drpc: transport ended");
                        break;
                    }
                    Err(ReadError::Protocol(e)) => {
                        log_protocol_error(&config.metrics, yamux_id, &e);
                        aborted = true;
                        break;
                    }
                };
                if pkt.stream_id < last_stream {
                    continue; // packet for an old stream: ignored, like drpcmanager
                }
                let is_invoke = matches!(pkt.kind, Kind::Invoke | Kind::InvokeMetadata);
                if pkt.stream_id == last_stream && last_stream != 0 {
                    if is_invoke {
                        let e = DrpcError::Metadata("invoke on existing stream".into());
                        log_protocol_error(&config.metrics, yamux_id, &e);
                        aborted = true;
                        break;
                    }
                    match on_call_packet(current.as_mut(), pkt, held) {
                        Ok(item) => pending = item,
                        Err(e) => {
                            log_protocol_error(&config.metrics, yamux_id, &e);
                            aborted = true;
                            break;
                        }
                    }
                    continue;
                }
                // A newer stream id: whatever it is, the current call is over.
                if let Some(c) = current.take() {
                    c.shared.terminate();
                }
                pending = None;
                match pkt.kind {
                    Kind::InvokeMetadata => match decode_metadata(&pkt.data) {
                        Ok(m) => meta = Some((pkt.stream_id, m)),
                        Err(e) => {
                            log_protocol_error(&config.metrics, yamux_id, &e);
                            aborted = true;
                            break;
                        }
                    },
                    Kind::Invoke => {
                        last_stream = pkt.stream_id;
                        let method = String::from_utf8_lossy(&pkt.data).into_owned();
                        let metadata = match meta.take() {
                            Some((sid, m)) if sid == pkt.stream_id => m,
                            _ => BTreeMap::new(),
                        };
                        // First invoke: offer the raw transport.
                        if writer.is_some() && reader.raw.is_some() {
                            let (Some(wr), Some(raw)) = (writer.take(), reader.raw.take()) else {
                                break;
                            };
                            let raw_invoke = Box::new(RawInvoke {
                                method: method.clone(),
                                metadata: metadata.clone(),
                                consumed: raw.freeze(),
                                reader: reader.rd,
                                writer: wr,
                            });
                            match handler.clone().take_over(raw_invoke) {
                                Ok(fut) => {
                                    fut.await;
                                    return;
                                }
                                Err(back) => {
                                    let back = *back;
                                    reader = PacketReader {
                                        rd: back.reader,
                                        buf: reader.buf,
                                        asm: reader.asm,
                                        raw: None,
                                        held: reader.held,
                                    };
                                    writer = Some(back.writer);
                                }
                            }
                        }
                        reader.raw = None;
                        let tx = match (&out, writer.take()) {
                            (Some(tx), _) => tx.clone(),
                            (None, Some(wr)) => {
                                let tx = TransportWriter::new(wr);
                                out = Some(tx.clone());
                                tx
                            }
                            (None, None) => break,
                        };
                        current = Some(start_call(
                            &handler, &config, pkt.stream_id, method, metadata, tx,
                        ).await);
                    }
                    _ => {
                        // Non-invoke packet for a stream that was never invoked: ignored.
                        last_stream = pkt.stream_id;
                    }
                }
            }
        }
    }
    // Transport over: cancel the call (dropping its future), then end the write side: RST after
    // a protocol error, else the packet in flight and FIN.
    if let Some(c) = current.take() {
        c.shared.terminate();
    }
    drop(writer);
    if let Some(out) = out {
        if aborted {
            out.abort().await;
        } else {
            out.finish().await;
        }
    }
}

/// Maps a packet for the current call to an inbound item (or nothing).
fn on_call_packet(
    current: Option<&mut Current>,
    pkt: Packet,
    held: HeldBytes,
) -> Result<Option<Inbound>, DrpcError> {
    let Some(c) = current else {
        return Ok(None);
    };
    let shared = &c.shared;
    match pkt.kind {
        Kind::Message => {
            let open = shared.with(|f| !f.recv_closed && !f.terminated);
            Ok(open.then_some(Inbound::Message(pkt.data, held)))
        }
        Kind::CloseSend => {
            let deliver = shared.with(|f| {
                if f.recv_closed || f.terminated {
                    return false;
                }
                f.recv_closed = true;
                if f.send_closed {
                    f.terminated = true;
                }
                true
            });
            Ok(deliver.then_some(Inbound::End))
        }
        Kind::Close => {
            let was = shared.is_terminated();
            shared.terminate();
            Ok((!was).then_some(Inbound::End))
        }
        Kind::Error => {
            let was = shared.is_terminated();
            shared.terminate();
            let (code, message) = decode_error(&pkt.data);
            Ok((!was).then_some(Inbound::Error(RpcError::Remote { code, message })))
        }
        Kind::Cancel => {
            shared.terminate();
            c.fut = None;
            Ok(None)
        }
        Kind::Invoke | Kind::InvokeMetadata => {
            Err(DrpcError::Metadata("invoke on existing stream".into()))
        }
        Kind::Unknown(k) => {
            if pkt.control {
                Ok(None)
            } else {
                Err(DrpcError::Metadata(format!("unknown packet kind {k}")))
            }
        }
    }
}

async fn start_call(
    handler: &Arc<dyn Handler>,
    config: &DrpcConfig,
    stream_id: u64,
    method: String,
    metadata: BTreeMap<String, String>,
    out: Arc<TransportWriter>,
) -> Current {
    let shared = CallShared::new();
    let (in_tx, in_rx) = mpsc::channel(config.recv_queue.max(1));
    let sender = RpcSender {
        stream_id,
        out,
        shared: shared.clone(),
    };
    let stream = RpcStream {
        method: method.clone(),
        metadata,
        tx: sender.clone(),
        rx: RpcReceiver {
            rx: in_rx,
            shared: shared.clone(),
            done: false,
        },
        _client_guard: None,
    };
    count(&config.metrics, |m| &m.drpc_calls);
    let fut = handler.clone().call(&method, stream);
    if fut.is_none() {
        count(&config.metrics, |m| &m.drpc_unknown_methods);
        tracing::debug!(method = %method, "drpc: unknown method");
        let e = RpcError::unimplemented(&method);
        let _ = sender.send_error(e.code(), &e.to_string()).await;
    }
    Current {
        stream_id,
        shared,
        in_tx,
        fut,
    }
}

/// After a handler returns: CloseSend on success, Error on failure (no-ops once terminated).
async fn finish_call(sender: Option<RpcSender>, res: Result<(), RpcError>) {
    let Some(sender) = sender else { return };
    match res {
        Ok(()) => {
            let _ = sender.close_send().await;
        }
        Err(e) => {
            let _ = sender.send_error(e.code(), &e.to_string()).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// dRPC client over a yamux client session: one yamux stream per call, dRPC stream id 1, exactly
/// like Coder's `drpcsdk.MultiplexedConn`.
#[derive(Debug)]
pub struct RpcClient {
    session: Session,
    config: DrpcConfig,
}

impl RpcClient {
    /// Wraps a client-role session.
    pub fn new(session: Session, config: DrpcConfig) -> Self {
        RpcClient { session, config }
    }

    /// The session (open, ping, close).
    pub fn session(&self) -> SessionHandle {
        self.session.handle()
    }

    /// Unary call: C→S Invoke, Message(req), CloseSend; expects S→C Message(resp) then
    /// CloseSend (or Error). Sends Close only if the server's CloseSend has not arrived yet, then
    /// closes the yamux stream — Go's `drpcconn.Invoke` sequence.
    pub async fn invoke_unary<Req, Resp>(&self, method: &str, req: &Req) -> Result<Resp, RpcError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let mut stream = self.start(method).await?;
        // A send can fail because the server already answered with an Error (e.g. unknown
        // method); the receive below then reports that error, which is the useful one.
        let sent = match stream.send_msg(req).await {
            Ok(()) => stream.close_send().await,
            Err(e) => Err(e),
        };
        let resp = match stream.recv_msg::<Resp>().await? {
            Some(r) => r,
            None => return Err(sent.err().unwrap_or(RpcError::Closed)),
        };
        let _ = stream.close().await;
        Ok(resp)
    }

    /// Opens a streaming call (server-streaming or bidi): sends Invoke at once. Dropping the
    /// returned stream (or its split receiver) closes the yamux stream.
    pub async fn open_stream(&self, method: &str) -> Result<RpcStream, RpcError> {
        self.start(method).await
    }

    async fn start(&self, method: &str) -> Result<RpcStream, RpcError> {
        open_client_call(&self.session.handle(), &self.config, method).await
    }
}

/// Opens a call on a yamux client session owned elsewhere (a session whose `accept` loop another
/// task runs, as the sidecar's upstream sessions): one yamux stream per call, dRPC stream id 1.
pub async fn open_call(
    session: &SessionHandle,
    config: &DrpcConfig,
    method: &str,
) -> Result<RpcStream, RpcError> {
    open_client_call(session, config, method).await
}

/// A unary call on a session owned elsewhere (see [`open_call`]), with the sequence of
/// [`RpcClient::invoke_unary`].
pub async fn invoke_unary_on<Req, Resp>(
    session: &SessionHandle,
    config: &DrpcConfig,
    method: &str,
    req: &Req,
) -> Result<Resp, RpcError>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let mut stream = open_client_call(session, config, method).await?;
    let sent = match stream.send_msg(req).await {
        Ok(()) => stream.close_send().await,
        Err(e) => Err(e),
    };
    let resp = match stream.recv_msg::<Resp>().await? {
        Some(r) => r,
        None => return Err(sent.err().unwrap_or(RpcError::Closed)),
    };
    let _ = stream.close().await;
    Ok(resp)
}

async fn open_client_call(
    session: &SessionHandle,
    config: &DrpcConfig,
    method: &str,
) -> Result<RpcStream, RpcError> {
    let stream = session
        .open()
        .await
        .map_err(|e| RpcError::Transport(e.to_string()))?;
    let (rd, wr) = stream.into_split();
    // The write side ends with FIN when the call's guard and every sender are gone (the last
    // `Arc` drops the stream's write half), or with RST from the reader on a protocol error.
    let out = TransportWriter::new(wr);
    let guard = CancellationToken::new();
    let shared = CallShared::new();
    let (in_tx, in_rx) = mpsc::channel(config.recv_queue.max(1));
    tokio::spawn(client_reader(
        PacketReader::new(rd, false),
        in_tx,
        shared.clone(),
        guard.clone(),
        out.clone(),
        config.metrics.clone(),
    ));
    let sender = RpcSender {
        stream_id: 1,
        out,
        shared: shared.clone(),
    };
    sender
        .write(
            Kind::Invoke,
            false,
            Bytes::copy_from_slice(method.as_bytes()),
        )
        .await?;
    Ok(RpcStream {
        method: method.to_string(),
        metadata: BTreeMap::new(),
        tx: sender,
        rx: RpcReceiver {
            rx: in_rx,
            shared,
            done: false,
        },
        _client_guard: Some(ClientGuard(guard)),
    })
}

async fn client_reader(
    mut reader: PacketReader,
    in_tx: mpsc::Sender<Inbound>,
    shared: Arc<CallShared>,
    guard: CancellationToken,
    out: Arc<TransportWriter>,
    metrics: MetricsRef,
) {
    let yamux_id = reader.rd.id();
    let guarded = guard.cancelled();
    tokio::pin!(guarded);
    loop {
        let pkt = tokio::select! {
            _ = &mut guarded => break,
            p = reader.next() => p,
        };
        let (pkt, held) = match pkt {
            Ok(p) => p,
            Err(ReadError::Eof) | Err(ReadError::Io(_)) => break,
            Err(ReadError::Protocol(e)) => {
                log_protocol_error(&metrics, yamux_id, &e);
                let _ = in_tx.try_send(Inbound::Error(RpcError::Protocol(e.to_string())));
                out.abort().await;
                break;
            }
        };
        if pkt.stream_id != 1 {
            continue;
        }
        let mut current = Current {
            stream_id: 1,
            shared: shared.clone(),
            in_tx: in_tx.clone(),
            fut: None,
        };
        let item = match on_call_packet(Some(&mut current), pkt, held) {
            Ok(i) => i,
            Err(e) => {
                log_protocol_error(&metrics, yamux_id, &e);
                let _ = in_tx.try_send(Inbound::Error(RpcError::Protocol(e.to_string())));
                out.abort().await;
                break;
            }
        };
        if let Some(item) = item {
            tokio::select! {
                _ = &mut guarded => break,
                r = in_tx.send(item) => if r.is_err() { break },
            }
        }
    }
    // The receiver sees the channel close: `None` if the call was terminated, else Canceled.
    shared.cancel.cancel();
}
