//! DERP over WebSocket: a WebSocket connection seen as a plain byte stream.
//!
//! Why this exists: browsers (and Tailscale's WASM client) can only reach DERP through a WebSocket
//! with the `derp` subprotocol. DERP frames are *not* aligned to WebSocket messages: the Go client
//! writes through a buffered writer, so a message may hold several frames or part of one. The only
//! faithful mapping is therefore "binary message payloads, concatenated, are the byte stream" in
//! both directions, which lets the very same DERP server core (`Server::accept`) and client run
//! over WebSockets unchanged.
//!
//! Rules (matching derper's `wsconn`):
//! - every `poll_write` becomes exactly one binary message (and is flushed eagerly, best effort);
//! - reads concatenate binary payloads; pings are answered by tungstenite itself;
//! - a text message is a protocol violation: we send close code 1003 (unsupported data) and the
//!   read side fails with `InvalidData`, which ends only this connection;
//! - a close frame with code 1000/1001 (or none) is end-of-stream; other codes are an error.
//!
//! This module must never buffer more than one received message per connection (the message size
//! itself is bounded by the WebSocket config, see [`websocket_config`]).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocol name DERP uses.
pub const SUBPROTOCOL: &str = "derp";

/// Largest WebSocket message (and frame) we accept: a full 1 MiB DERP frame plus its header and
/// generous slack. Go's library defaults to 32 KiB; a 64 KiB DERP packet must fit.
pub const MAX_MESSAGE_SIZE: usize = 2 << 20;

/// Largest WebSocket message we send. Go's WebSocket library (coder/websocket, used by
/// Tailscale's DERP client) refuses messages over 32 KiB on read and never raises that limit, so
/// one 64 KiB DERP packet frame sent as one message kills the client's connection with 1009.
/// DERP frames need not align with messages, so a larger write goes out as several messages.
pub const MAX_OUTBOUND_MESSAGE: usize = 32 * 1024;

/// tungstenite's read buffer per connection. Its default (128 KiB) is zero-filled before every
/// socket read and stays allocated for the life of the connection, which would make an idle
/// WebSocket DERP client cost several times a TCP one. Peers send at most 32 KiB per message
/// anyway (see [`MAX_OUTBOUND_MESSAGE`]).
pub const READ_BUFFER_SIZE: usize = 16 * 1024;

/// The tungstenite configuration used on both sides: bounded messages, a small read buffer, no
/// compression (tungstenite never negotiates permessage-deflate in our build).
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE))
        .read_buffer_size(READ_BUFFER_SIZE)
}

/// Where the read side is.
#[derive(Debug)]
enum ReadState {
    /// Normal operation.
    Open,
    /// A text message arrived: a 1003 close frame must be queued, then flushed.
    SendClose(CloseFrame),
    /// The 1003 close frame was queued; flush it, then report the violation.
    FlushClose,
    /// The stream is over: EOF forever (or the violation error once, then EOF).
    Done {
        violation_reported: bool,
        violation: bool,
    },
}

/// A WebSocket connection adapted to [`AsyncRead`] + [`AsyncWrite`] (binary messages as a byte
/// stream). See the module docs for the exact rules.
pub struct WsByteStream<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
    state: ReadState,
    write_closed: bool,
    text_messages: Option<prometheus::IntCounter>,
}

impl<S> std::fmt::Debug for WsByteStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsByteStream")
            .field("pending", &self.pending.len())
            .field("state", &self.state)
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

impl<S> WsByteStream<S> {
    /// Wraps an established WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsByteStream {
            ws,
            pending: Bytes::new(),
            state: ReadState::Open,
            write_closed: false,
            text_messages: None,
        }
    }

    /// Counts text messages (protocol violations) on `counter`.
    pub fn with_text_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.text_messages = Some(counter);
        self
    }
}

fn ws_to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::other(other),
    }
}

impl<S> WsByteStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn ws(&mut self) -> Pin<&mut WebSocketStream<S>> {
        Pin::new(&mut self.ws)
    }
}

impl<S> AsyncRead for WsByteStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match std::mem::replace(&mut this.state, ReadState::Open) {
                ReadState::Open => {}
                ReadState::SendClose(frame) => match this.ws().poll_ready(cx) {
                    Poll::Pending => {
                        this.state = ReadState::SendClose(frame);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(())) => {
                        // Errors here mean the socket is already gone; nothing more to say.
                        let _ = this.ws().start_send(Message::Close(Some(frame)));
                        this.state = ReadState::FlushClose;
                        continue;
                    }
                    Poll::Ready(Err(_)) => {
                        this.state = ReadState::Done {
                            violation_reported: false,
                            violation: true,
                        };
                        continue;
                    }
                },
                ReadState::FlushClose => match this.ws().poll_flush(cx) {
                    Poll::Pending => {
                        this.state = ReadState::FlushClose;
                        return Poll::Pending;
                    }
                    Poll::Ready(_) => {
                        this.state = ReadState::Done {
                            violation_reported: false,
                            violation: true,
                        };
                        continue;
                    }
                },
                ReadState::Done {
                    violation_reported,
                    violation,
                } => {
                    this.state = ReadState::Done {
                        violation_reported: true,
                        violation,
                    };
                    if violation && !violation_reported {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "websocket text message (closed with 1003)",
                        )));
                    }
                    return Poll::Ready(Ok(()));
                }
            }

            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }

            let eof = ReadState::Done {
                violation_reported: false,
                violation: false,
            };
            match ready!(this.ws().poll_next(cx)) {
                None => this.state = eof,
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    if let Some(c) = &this.text_messages {
                        c.inc();
                    }
                    this.state = ReadState::SendClose(CloseFrame {
                        code: CloseCode::Unsupported,
                        reason: "binary messages only".into(),
                    });
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.as_ref().map(|f| f.code);
                    match code {
                        None | Some(CloseCode::Normal) | Some(CloseCode::Away) => this.state = eof,
                        Some(code) => {
                            this.state = eof;
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                format!("websocket closed with code {}", u16::from(code)),
                            )));
                        }
                    }
                }
                // Pings are answered by tungstenite on the next read/write/flush.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => this.state = eof,
                Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
                    this.state = eof;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "websocket peer went away without a close frame",
                    )));
                }
                Some(Err(e)) => {
                    this.state = eof;
                    return Poll::Ready(Err(ws_to_io(e)));
                }
            }
        }
    }
}

impl<S> AsyncWrite for WsByteStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "websocket write side closed",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let chunk = &buf[..buf.len().min(MAX_OUTBOUND_MESSAGE)];
        ready!(this.ws().poll_ready(cx)).map_err(ws_to_io)?;
        this.ws()
            .start_send(Message::Binary(Bytes::copy_from_slice(chunk)))
            .map_err(ws_to_io)?;
        // Push the message out now so callers that forget to flush still make progress; an
        // error here resurfaces on the next write or flush.
        let _ = this.ws().poll_flush(cx);
        Poll::Ready(Ok(chunk.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.ws().poll_flush(cx).map_err(ws_to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.write_closed = true;
        match ready!(this.ws().poll_close(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_to_io(e))),
        }
    }
}

#[cfg(test)]
mod edge_tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (
        WsByteStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server =
            WebSocketStream::from_raw_socket(a, Role::Server, Some(websocket_config())).await;
        let client =
            WebSocketStream::from_raw_socket(b, Role::Client, Some(websocket_config())).await;
        (WsByteStream::new(server), client)
    }

    #[tokio::test]
    async fn edge_binary_messages_are_a_byte_stream() {
        let (mut s, mut c) = pair().await;
        c.send(Message::Binary(Bytes::from_static(b"hel")))
            .await
            .unwrap();
        c.send(Message::Binary(Bytes::from_static(b"lo wor")))
            .await
            .unwrap();
        c.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        c.send(Message::Binary(Bytes::from_static(b"ld")))
            .await
            .unwrap();
        let mut got = [0u8; 11];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
        // The ping was answered.
        s.write_all(b"x").await.unwrap();
        let mut saw_pong = false;
        loop {
            match c.next().await.unwrap().unwrap() {
                Message::Pong(p) => {
                    assert_eq!(&p[..], b"p");
                    saw_pong = true;
                }
                Message::Binary(b) => {
                    assert_eq!(&b[..], b"x");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(saw_pong);
    }

    #[tokio::test]
    async fn edge_each_write_is_one_binary_message() {
        let (mut s, mut c) = pair().await;
        s.write_all(b"abc").await.unwrap();
        s.write_all(&vec![7u8; MAX_OUTBOUND_MESSAGE]).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            c.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"abc"))
        );
        match c.next().await.unwrap().unwrap() {
            Message::Binary(b) => assert_eq!(b.len(), MAX_OUTBOUND_MESSAGE),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Regression (found by the Go interop suite): Go's client reads at most 32 KiB per message.
    #[tokio::test]
    async fn edge_large_writes_are_split_into_32k_messages() {
        let (mut s, mut c) = pair().await;
        let data: Vec<u8> = (0..65_573u32).map(|i| i as u8).collect();
        s.write_all(&data).await.unwrap();
        s.flush().await.unwrap();
        let mut got = Vec::new();
        while got.len() < data.len() {
            match c.next().await.unwrap().unwrap() {
                Message::Binary(b) => {
                    assert!(
                        b.len() <= MAX_OUTBOUND_MESSAGE,
                        "message of {} bytes",
                        b.len()
                    );
                    got.extend_from_slice(&b);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn edge_text_message_closes_with_1003() {
        let (mut s, mut c) = pair().await;
        let counter = prometheus::IntCounter::new("t", "t").unwrap();
        s = s.with_text_counter(counter.clone());
        c.send(Message::Text("hi".into())).await.unwrap();
        let mut b = [0u8; 4];
        let err = s.read(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(s.read(&mut b).await.unwrap(), 0);
        assert_eq!(counter.get(), 1);
        match c.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Unsupported),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn edge_normal_close_is_eof_other_codes_are_errors() {
        let (mut s, mut c) = pair().await;
        c.send(Message::Binary(Bytes::from_static(b"z")))
            .await
            .unwrap();
        c.close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "".into(),
        }))
        .await
        .unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
        assert_eq!(v, b"z");

        let (mut s, mut c) = pair().await;
        c.close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: "".into(),
        }))
        .await
        .unwrap();
        let mut b = [0u8; 1];
        let err = s.read(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }
}
