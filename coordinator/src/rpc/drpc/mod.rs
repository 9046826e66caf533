//! dRPC over yamux streams with storj drpc v0.0.34 semantics: the server side (one dRPC
//! connection per accepted yamux stream, dispatching invokes to a [`Handler`]) and the client side
//! ([`RpcClient`], one yamux stream per call, exactly Go's call patterns).
//!
//! Why: Coder's agents and clients run `drpcconn`/`drpcserver` over yamux; the byte-level rules
//! (ids, kinds, half-close, error bodies, 4 MiB packets) must match or Go peers break. Frame and
//! packet rules live in `proto::drpc`; this module owns the connection state machine.
//!
//! Per transport (yamux stream) the server runs one task that reads packets through
//! `proto::drpc::PacketAssembler` and polls the active handler future in the same `select!`; the
//! tasks are held by [`serve`] and end with it. A client call has one reader task, owned by the
//! call (dropping the call's stream aborts it).
//! Outgoing packets need no task: senders number, encode and write them straight into the yamux
//! stream through a shared `TransportWriter` (one packet in flight, back-pressure by the yamux send
//! window, as Go's `drpcwire.Writer`). Handlers are cancelled by
//! dropping their future (a new Invoke with a higher stream id, a Cancel, or the transport ending),
//! so **handlers must be cancel-safe**; they can also watch [`RpcStream::cancelled`].
//!
//! Files by role: `mod.rs` the API seen by handlers and callers (errors, [`Handler`], config);
//! `call.rs` one call's state and handles; `reader.rs` packets in; `writer.rs` packets out;
//! `server.rs` serving accepted streams; `client.rs` opening calls.
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

use std::collections::{BTreeMap, VecDeque};
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
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::yamux::{
    HeldBytes, Session, SessionError, SessionHandle, Stream, StreamReader, StreamWriter,
};
use super::{count, MetricsRef};

/// How much room we reserve per read. Small on purpose: a coordination session idles between
/// updates of a few hundred bytes (10,000 sessions × 64 KiB was most of the coordinator's memory);
/// a large packet simply takes several reads (the buffer grows geometrically). The buffer is
/// given back whenever it holds nothing partial, so an idle stream holds none.
const READ_CHUNK: usize = 2 * 1024;
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

mod call;
mod client;
mod reader;
mod server;
mod writer;

use call::{on_call_packet, CallShared, ClientGuard, Current, Inbound, Inbox, InboxSender};
pub use call::{RpcReceiver, RpcReceiverOwned, RpcSender, RpcStream};
pub use client::{invoke_unary_on, open_call, RpcClient};
use reader::{log_protocol_error, PacketReader, ReadError};
pub use server::{serve, serve_stream};
use writer::{OutPacket, TransportWriter};
