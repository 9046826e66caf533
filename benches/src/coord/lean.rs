//! The lean Coder v2 client of the coordinator workload: WebSocket → yamux → dRPC `Coordinate`
//! written out by hand on one plain `TcpStream`, driven by ONE task per connection.
//!
//! Why: the workload is symmetric (every update the server sends, the load generator receives),
//! and the coordinator crate's full client stack (WebSocket pumps, a yamux session, dRPC reader and
//! writer tasks, channel hops in between) costs about as much CPU per message as the server. On a
//! machine where the load generator has one core, it then saturates together with the server, its
//! agents stop reading, and the server kicks them: the server's capacity could not be measured.
//! This client does only what the load needs: the HTTP/1.1 upgrade, masked client frames (one
//! fixed mask per connection, XORed a word at a time), server frames parsed in place from one
//! reusable read buffer, one yamux stream (id 1) with hashicorp's window rules, one dRPC stream
//! (id 1), and protobuf encode/decode through `proto::tailnet::v2`. Everything one wake-up
//! produces (window updates, ping replies, an update) leaves in one write.
//!
//! It must never be used as a general client: it opens exactly one stream, never sends keepalive
//! pings, ignores streams it did not open, and treats any end of its stream (WebSocket close,
//! yamux FIN/RST/GoAway, dRPC Close/CloseSend/Error) as a failure, which is what the workload
//! counts. It must never buffer without bound: the read buffer is fixed, a dRPC packet is capped at
//! `proto::drpc::MAX_PACKET_SIZE`, and output is written before the next read.

use std::io;

use prost::Message;
use proto::drpc::{self, Kind};
use proto::tailnet::v2::{CoordinateRequest, CoordinateResponse};
use proto::yamux::{Flags, Header, Type, HEADER_LEN, INITIAL_WINDOW};
use rand::RngCore;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Read buffer per connection (fixed; only a partial WebSocket header or control frame, at most
/// 139 bytes, is ever carried over between reads).
const READ_BUF: usize = 16 * 1024;
/// Longest HTTP response head accepted for the upgrade.
const MAX_HEAD: usize = 8 * 1024;
/// Largest payload we put in one client WebSocket frame (Go's `websocket.NetConn` reader limits
/// messages; yamux does not care where frames split).
const MAX_WS_PAYLOAD: usize = 16 * 1024;
/// The only yamux stream we open (clients use odd ids, starting at 1).
const YAMUX_STREAM: u32 = 1;
/// The only dRPC stream on it (Coder's clients use 1).
const DRPC_STREAM: u64 = 1;
/// Largest control byte + three varints for the ids and lengths we produce.
const MAX_DRPC_HEADER: usize = drpc::MAX_FRAME_HEADER_LEN;

/// Why a lean connection ended. Every variant ends only that connection.
#[derive(Debug, thiserror::Error)]
pub enum LeanError {
    /// Socket error.
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// The server closed the TCP connection.
    #[error("connection closed by the server")]
    Eof,
    /// The HTTP upgrade did not return 101.
    #[error("upgrade refused: {0}")]
    Upgrade(String),
    /// A WebSocket frame we cannot accept.
    #[error("websocket: {0}")]
    WebSocket(&'static str),
    /// The server sent a WebSocket close.
    #[error("websocket closed by the server (code {0})")]
    WsClosed(u16),
    /// Malformed yamux header.
    #[error("{0}")]
    Yamux(#[from] proto::yamux::HeaderError),
    /// The server ended the yamux session.
    #[error("yamux go away (code {0})")]
    GoAway(u32),
    /// The server reset our yamux stream.
    #[error("yamux stream reset by the server")]
    Reset,
    /// The server half-closed our yamux stream.
    #[error("yamux stream closed by the server")]
    StreamClosed,
    /// Malformed dRPC framing.
    #[error("{0}")]
    Drpc(#[from] drpc::DrpcError),
    /// The server sent a dRPC error packet.
    #[error("drpc error {code}: {message}")]
    Remote {
        /// drpcerr code.
        code: u64,
        /// Text.
        message: String,
    },
    /// The server closed the dRPC stream (Close or CloseSend).
    #[error("drpc stream closed by the server")]
    DrpcClosed,
    /// A message that is not a `CoordinateResponse`.
    #[error("protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A request larger than one dRPC frame (never produced by this workload).
    #[error("request of {0} bytes is too large")]
    TooLarge(usize),
}

/// XORs `buf` with the 4-byte WebSocket `mask`, starting at mask offset 0, 8 bytes at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let [a, b, c, d] = mask;
    let word = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut chunks = buf.chunks_exact_mut(8);
    for ch in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(ch);
        ch.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the mask phase is again 0.
    for (i, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x ^= mask[i & 3];
    }
}

/// Standard base64 with padding (for the 16-byte `Sec-WebSocket-Key`).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for ch in data.chunks(3) {
        let n = (u32::from(ch[0]) << 16)
            | (u32::from(*ch.get(1).unwrap_or(&0)) << 8)
            | u32::from(*ch.get(2).unwrap_or(&0));
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= ch.len() {
                s.push(T[((n >> shift) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The HTTP/1.1 upgrade request for `path` on `authority` (`host:port`).
pub fn upgrade_request(authority: &str, path: &str, token: Option<&str>, key: &str) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(t) = token {
        r.push_str("Coder-Session-Token: ");
        r.push_str(t);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r
}

/// The protocol state of one connection, without the socket: parses server bytes, queues client
/// bytes. Pure, so it can be tested byte by byte.
pub struct Wire {
    mask: [u8; 4],
    /// yamux bytes produced since the last [`Wire::seal`].
    yout: Vec<u8>,
    /// Framed, masked WebSocket bytes ready to write.
    wout: Vec<u8>,
    /// Bytes we may still send on stream 1 (the server's receive window).
    send_window: u32,
    /// Next outgoing dRPC message id (the Invoke is 1).
    next_msg_id: u64,
    /// Payload bytes left in the current server WebSocket frame.
    ws_left: u64,
    /// Opcode of the current frame if it is a control frame (0 for data).
    ws_ctrl: u8,
    /// Control frame payload (≤ 125 bytes).
    ctrl: Vec<u8>,
    /// Partial yamux header.
    yhdr: [u8; HEADER_LEN],
    yhdr_len: usize,
    /// Payload bytes left in the current yamux data frame, its stream and flags.
    ydata_left: u32,
    ydata_stream: u32,
    ydata_flags: Flags,
    /// Stream-1 bytes consumed but not yet returned to the server's send window.
    recv_unacked: u32,
    /// Stream-1 bytes not yet parsed as dRPC frames.
    dbuf: Vec<u8>,
    /// A multi-frame dRPC packet being assembled, and its message id.
    pkt: Vec<u8>,
    pkt_id: Option<u64>,
}

impl Wire {
    /// Fresh state with a random mask.
    pub fn new() -> Wire {
        let mut mask = [0u8; 4];
        rand::thread_rng().fill_bytes(&mut mask);
        Wire::with_mask(mask)
    }

    /// Fresh state with a given mask.
    pub fn with_mask(mask: [u8; 4]) -> Wire {
        Wire {
            mask,
            yout: Vec::with_capacity(1024),
            wout: Vec::with_capacity(1024),
            send_window: INITIAL_WINDOW,
            next_msg_id: 1,
            ws_left: 0,
            ws_ctrl: 0,
            ctrl: Vec::new(),
            yhdr: [0; HEADER_LEN],
            yhdr_len: 0,
            ydata_left: 0,
            ydata_stream: 0,
            ydata_flags: Flags::NONE,
            recv_unacked: 0,
            dbuf: Vec::new(),
            pkt: Vec::new(),
            pkt_id: None,
        }
    }

    /// Bytes we may still send on the stream.
    pub fn send_window(&self) -> u32 {
        self.send_window
    }

    /// Opens yamux stream 1 (WindowUpdate+SYN, delta 0: our window is the default) and invokes
    /// `method` on dRPC stream 1.
    pub fn queue_open(&mut self, method: &str) {
        self.yout
            .extend_from_slice(&Header::window_update(Flags::SYN, YAMUX_STREAM, 0).encode());
        let id = self.next_msg_id;
        self.next_msg_id += 1;
        let mut hdr = [0u8; MAX_DRPC_HEADER];
        let h = drpc_header(&mut hdr, Kind::Invoke, id, method.len());
        let len = h + method.len();
        // Always far below the initial window; no flags: the SYN went with the window update.
        self.send_window = self.send_window.saturating_sub(len as u32);
        self.yout
            .extend_from_slice(&Header::data(Flags::NONE, YAMUX_STREAM, len as u32).encode());
        self.yout.extend_from_slice(&hdr[..h]);
        self.yout.extend_from_slice(method.as_bytes());
    }

    /// Encodes `req` as the next dRPC Message on stream 1. `Ok(false)` (nothing queued) if the
    /// server's window has no room for it yet.
    pub fn queue_request(&mut self, req: &CoordinateRequest) -> Result<bool, LeanError> {
        let body = req.encoded_len();
        if body > drpc::MAX_FRAME_DATA {
            return Err(LeanError::TooLarge(body));
        }
        let mut hdr = [0u8; MAX_DRPC_HEADER];
        let h = drpc_header(&mut hdr, Kind::Message, self.next_msg_id, body);
        let len = (h + body) as u32;
        if len > self.send_window {
            return Ok(false);
        }
        self.next_msg_id += 1;
        self.send_window -= len;
        self.yout
            .extend_from_slice(&Header::data(Flags::NONE, YAMUX_STREAM, len).encode());
        self.yout.extend_from_slice(&hdr[..h]);
        req.encode_raw(&mut self.yout);
        Ok(true)
    }

    /// Frames everything queued as masked binary WebSocket frames into the write buffer.
    pub fn seal(&mut self) {
        let mut rest = &self.yout[..];
        while !rest.is_empty() {
            let n = rest.len().min(MAX_WS_PAYLOAD);
            let (chunk, tail) = rest.split_at(n);
            push_ws_frame(&mut self.wout, 0x2, chunk, self.mask);
            rest = tail;
        }
        self.yout.clear();
    }

    /// Bytes ready to write.
    pub fn output(&self) -> &[u8] {
        &self.wout
    }

    /// Forgets the written output.
    pub fn clear_output(&mut self) {
        self.wout.clear();
    }

    /// Parses server bytes, calling `on` for every `CoordinateResponse`. Returns how many bytes
    /// were consumed; the rest (an incomplete WebSocket header or control frame) must be offered
    /// again with more bytes appended.
    pub fn feed(
        &mut self,
        buf: &[u8],
        on: &mut dyn FnMut(&CoordinateResponse),
    ) -> Result<usize, LeanError> {
        let mut pos = 0;
        loop {
            if self.ws_left > 0 {
                let avail = buf.len() - pos;
                if avail == 0 {
                    break;
                }
                let n = avail.min(usize::try_from(self.ws_left).unwrap_or(usize::MAX));
                let chunk = &buf[pos..pos + n];
                pos += n;
                self.ws_left -= n as u64;
                if self.ws_ctrl != 0 {
                    self.ctrl.extend_from_slice(chunk);
                    if self.ws_left == 0 {
                        self.on_control()?;
                    }
                } else {
                    self.feed_yamux(chunk, on)?;
                }
                continue;
            }
            let b = &buf[pos..];
            let [b0, b1, ..] = *b else { break };
            if b0 & 0x70 != 0 {
                return Err(LeanError::WebSocket("reserved bits set"));
            }
            if b1 & 0x80 != 0 {
                return Err(LeanError::WebSocket("masked server frame"));
            }
            let (len, hl) = match b1 & 0x7f {
                126 => match b.get(2..4) {
                    Some(l) => (u64::from(u16::from_be_bytes([l[0], l[1]])), 4),
                    None => break,
                },
                127 => match b.get(2..10).and_then(|l| <[u8; 8]>::try_from(l).ok()) {
                    Some(l) => (u64::from_be_bytes(l), 10),
                    None => break,
                },
                n => (u64::from(n), 2),
            };
            let op = b0 & 0x0f;
            match op {
                0 | 2 => self.ws_ctrl = 0,
                1 => return Err(LeanError::WebSocket("text message")),
                8..=10 => {
                    if len > 125 || b0 & 0x80 == 0 {
                        return Err(LeanError::WebSocket("bad control frame"));
                    }
                    self.ws_ctrl = op;
                    self.ctrl.clear();
                }
                _ => return Err(LeanError::WebSocket("unknown opcode")),
            }
            pos += hl;
            self.ws_left = len;
            if len == 0 && self.ws_ctrl != 0 {
                self.on_control()?;
            }
        }
        Ok(pos)
    }

    fn on_control(&mut self) -> Result<(), LeanError> {
        match self.ws_ctrl {
            8 => {
                let code = match self.ctrl[..] {
                    [a, b, ..] => u16::from_be_bytes([a, b]),
                    _ => 1005,
                };
                return Err(LeanError::WsClosed(code));
            }
            9 => push_ws_frame(&mut self.wout, 0xA, &self.ctrl, self.mask),
            _ => {}
        }
        self.ws_ctrl = 0;
        Ok(())
    }

    fn feed_yamux(
        &mut self,
        mut c: &[u8],
        on: &mut dyn FnMut(&CoordinateResponse),
    ) -> Result<(), LeanError> {
        while !c.is_empty() {
            if self.ydata_left > 0 {
                let n = c.len().min(self.ydata_left as usize);
                if self.ydata_stream == YAMUX_STREAM {
                    self.dbuf.extend_from_slice(&c[..n]);
                    self.recv_unacked = self.recv_unacked.saturating_add(n as u32);
                }
                self.ydata_left -= n as u32;
                c = &c[n..];
                if self.ydata_left == 0 {
                    self.end_of_data(on)?;
                }
                continue;
            }
            let n = (HEADER_LEN - self.yhdr_len).min(c.len());
            self.yhdr[self.yhdr_len..self.yhdr_len + n].copy_from_slice(&c[..n]);
            self.yhdr_len += n;
            c = &c[n..];
            if self.yhdr_len < HEADER_LEN {
                break;
            }
            self.yhdr_len = 0;
            let Some(h) = Header::decode(&self.yhdr)? else {
                break;
            };
            match h.typ {
                Type::Data => {
                    self.ydata_stream = h.stream_id;
                    self.ydata_flags = h.flags;
                    self.ydata_left = h.length;
                    if h.length == 0 {
                        self.end_of_data(on)?;
                    }
                }
                Type::WindowUpdate => {
                    if h.stream_id == YAMUX_STREAM {
                        self.send_window = self.send_window.saturating_add(h.length);
                        stream_flags(h.flags)?;
                    }
                }
                Type::Ping => {
                    if h.flags.contains(Flags::SYN) {
                        self.yout
                            .extend_from_slice(&Header::ping(Flags::ACK, h.length).encode());
                    }
                }
                Type::GoAway => return Err(LeanError::GoAway(h.length)),
            }
        }
        Ok(())
    }

    /// A data frame is complete: parse what it brought, return window, then honour its flags.
    fn end_of_data(&mut self, on: &mut dyn FnMut(&CoordinateResponse)) -> Result<(), LeanError> {
        if self.ydata_stream != YAMUX_STREAM {
            return Ok(());
        }
        self.drain_drpc(on)?;
        if self.recv_unacked >= INITIAL_WINDOW / 2 {
            self.yout.extend_from_slice(
                &Header::window_update(Flags::NONE, YAMUX_STREAM, self.recv_unacked).encode(),
            );
            self.recv_unacked = 0;
        }
        stream_flags(self.ydata_flags)
    }

    fn drain_drpc(&mut self, on: &mut dyn FnMut(&CoordinateResponse)) -> Result<(), LeanError> {
        let dbuf = std::mem::take(&mut self.dbuf);
        let res = self.drain_frames(&dbuf, on);
        self.dbuf = dbuf;
        let used = res?;
        self.dbuf.drain(..used);
        Ok(())
    }

    fn drain_frames(
        &mut self,
        buf: &[u8],
        on: &mut dyn FnMut(&CoordinateResponse),
    ) -> Result<usize, LeanError> {
        let mut pos = 0;
        loop {
            let b = &buf[pos..];
            let Some(&cb) = b.first() else { break };
            let mut p = 1;
            let next = |p: &mut usize| -> Result<Option<u64>, LeanError> {
                Ok(drpc::read_varint(&b[*p..])?.map(|(v, n)| {
                    *p += n;
                    v
                }))
            };
            let Some(sid) = next(&mut p)? else { break };
            let Some(mid) = next(&mut p)? else { break };
            let Some(len) = next(&mut p)? else { break };
            if len > drpc::MAX_FRAME_DATA_ACCEPTED as u64 {
                return Err(drpc::DrpcError::FrameTooLarge(len).into());
            }
            let len = len as usize;
            let Some(data) = b.get(p..p + len) else { break };
            pos += p + len;
            let kind = Kind::from_bits(cb >> 1);
            let done = cb & 0x01 != 0;
            if (cb & 0x80 != 0 && !kind.is_known()) || sid != DRPC_STREAM {
                continue;
            }
            match kind {
                Kind::Message => {
                    if self.pkt_id != Some(mid) {
                        self.pkt.clear();
                        self.pkt_id = None;
                    }
                    if done && self.pkt_id.is_none() {
                        on(&CoordinateResponse::decode(data)?);
                        continue;
                    }
                    if self.pkt.len() + data.len() > drpc::MAX_PACKET_SIZE {
                        return Err(drpc::DrpcError::DataOverflow.into());
                    }
                    self.pkt.extend_from_slice(data);
                    self.pkt_id = Some(mid);
                    if done {
                        let r = CoordinateResponse::decode(&self.pkt[..]);
                        self.pkt = Vec::new();
                        self.pkt_id = None;
                        on(&r?);
                    }
                }
                Kind::Error => {
                    let (code, message) = drpc::decode_error(data);
                    return Err(LeanError::Remote { code, message });
                }
                Kind::Close | Kind::CloseSend => return Err(LeanError::DrpcClosed),
                _ => {}
            }
        }
        Ok(pos)
    }
}

impl Default for Wire {
    fn default() -> Self {
        Wire::new()
    }
}

/// FIN or RST on our stream ends it.
fn stream_flags(f: Flags) -> Result<(), LeanError> {
    if f.contains(Flags::RST) {
        return Err(LeanError::Reset);
    }
    if f.contains(Flags::FIN) {
        return Err(LeanError::StreamClosed);
    }
    Ok(())
}

/// Writes a single-frame dRPC header for stream 1 into `out`; returns its length.
fn drpc_header(out: &mut [u8; MAX_DRPC_HEADER], kind: Kind, msg_id: u64, len: usize) -> usize {
    let mut w = &mut out[..];
    let start = w.len();
    bytes::BufMut::put_u8(&mut w, (kind.to_bits() << 1) | 0x01);
    drpc::put_varint(DRPC_STREAM, &mut w);
    drpc::put_varint(msg_id, &mut w);
    drpc::put_varint(len as u64, &mut w);
    start - w.len()
}

/// Appends one FIN frame with `opcode`, masked with `mask`.
fn push_ws_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let at = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[at..], mask);
}

/// One lean connection: the socket, a fixed read buffer and the [`Wire`] state.
pub struct LeanConn {
    sock: TcpStream,
    rbuf: Box<[u8]>,
    rlen: usize,
    /// Protocol state (queue requests here, then [`LeanConn::flush`]).
    pub wire: Wire,
}

impl LeanConn {
    /// Connects to `authority` (`host:port`) and upgrades `path` to a WebSocket.
    pub async fn connect(
        authority: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<LeanConn, LeanError> {
        let sock = TcpStream::connect(authority).await?;
        sock.set_nodelay(true)?;
        let mut key = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut key);
        let mut c = LeanConn {
            sock,
            rbuf: vec![0u8; READ_BUF].into_boxed_slice(),
            rlen: 0,
            wire: Wire::new(),
        };
        let req = upgrade_request(authority, path, token, &base64(&key));
        c.sock.write_all(req.as_bytes()).await?;
        let head_end = loop {
            if let Some(i) = find_head_end(&c.rbuf[..c.rlen]) {
                break i;
            }
            if c.rlen >= MAX_HEAD {
                return Err(LeanError::Upgrade("response head too long".into()));
            }
            c.read().await?;
        };
        let head = String::from_utf8_lossy(&c.rbuf[..head_end]);
        let status = head.lines().next().unwrap_or("");
        if status.split_whitespace().nth(1) != Some("101") {
            return Err(LeanError::Upgrade(status.to_string()));
        }
        c.rbuf.copy_within(head_end..c.rlen, 0);
        c.rlen -= head_end;
        Ok(c)
    }

    /// Waits for and reads some bytes into the read buffer. Cancel-safe.
    pub async fn read(&mut self) -> Result<(), LeanError> {
        if self.rlen == self.rbuf.len() {
            // Cannot happen after `process` (it leaves < 140 bytes); never read into nothing.
            return Err(LeanError::WebSocket("read buffer full"));
        }
        loop {
            self.sock.readable().await?;
            match self.sock.try_read(&mut self.rbuf[self.rlen..]) {
                Ok(0) => return Err(LeanError::Eof),
                Ok(n) => {
                    self.rlen += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Parses everything read so far (see [`Wire::feed`]).
    pub fn process(&mut self, on: &mut dyn FnMut(&CoordinateResponse)) -> Result<(), LeanError> {
        let used = self.wire.feed(&self.rbuf[..self.rlen], on)?;
        self.rbuf.copy_within(used..self.rlen, 0);
        self.rlen -= used;
        Ok(())
    }

    /// Frames and writes everything queued, in one write.
    pub async fn flush(&mut self) -> Result<(), LeanError> {
        self.wire.seal();
        if !self.wire.output().is_empty() {
            self.sock.write_all(self.wire.output()).await?;
            self.wire.clear_output();
        }
        Ok(())
    }
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

#[cfg(test)]
mod tests {

    use super::*;
    use proto::tailnet::v2::coordinate_response::peer_update::Kind as UpdKind;
    use proto::tailnet::v2::coordinate_response::PeerUpdate;

    const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

    /// Unmasks every client frame in `b` and returns (opcode, payload) pairs.
    fn client_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(b[0] & 0x80, 0x80, "FIN");
            assert_eq!(b[1] & 0x80, 0x80, "client frames are masked");
            let (len, mut at) = match b[1] & 0x7f {
                126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            let mask: [u8; 4] = b[at..at + 4].try_into().unwrap();
            at += 4;
            let mut p = b[at..at + len].to_vec();
            for (i, x) in p.iter_mut().enumerate() {
                *x ^= mask[i % 4];
            }
            out.push((b[0] & 0x0f, p));
            b = &b[at + len..];
        }
        out
    }

    fn server_frame(op: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80 | op];
        if payload.len() < 126 {
            v.push(payload.len() as u8);
        } else if payload.len() <= 0xffff {
            v.push(126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    fn response(marker: u8) -> CoordinateResponse {
        CoordinateResponse {
            peer_updates: vec![PeerUpdate {
                id: bytes::Bytes::from(vec![marker; 16]),
                node: None,
                kind: UpdKind::Node as i32,
                reason: String::new(),
            }],
            error: String::new(),
        }
    }

    fn feed_all(w: &mut Wire, bytes: &[u8], step: usize) -> Result<Vec<u8>, LeanError> {
        let mut got = Vec::new();
        let mut buf = Vec::new();
        for ch in bytes.chunks(step) {
            buf.extend_from_slice(ch);
            let used = w.feed(&buf, &mut |r| got.push(r.peer_updates[0].id[0]))?;
            buf.drain(..used);
        }
        assert!(buf.len() < 140);
        Ok(got)
    }

    #[test]
    fn base64_matches_rfc6455_example() {
        assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn mask_matches_bytewise_xor() {
        for len in 0..40 {
            let orig: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
            let mut fast = orig.clone();
            apply_mask(&mut fast, MASK);
            let slow: Vec<u8> = orig
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn upgrade_request_has_the_headers() {
        let r = upgrade_request("127.0.0.1:1", "/a?b=c", Some("tok"), "KEY");
        assert!(r.starts_with("GET /a?b=c HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"));
        assert!(r.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(r.contains("Sec-WebSocket-Key: KEY\r\n"));
        assert!(r.contains("Coder-Session-Token: tok\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
        assert!(!upgrade_request("h:1", "/", None, "K").contains("Coder-Session-Token"));
    }

    #[test]
    fn open_and_request_produce_exact_frames() {
        let mut w = Wire::with_mask(MASK);
        w.queue_open("/m");
        let req = CoordinateRequest::default();
        assert!(w.queue_request(&req).unwrap());
        w.seal();
        let frames = client_frames(w.output());
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, 2);
        let y = &frames[0].1;
        // WindowUpdate SYN stream 1 delta 0.
        assert_eq!(&y[..12], &Header::window_update(Flags::SYN, 1, 0).encode());
        // Data stream 1: drpc Invoke (kind 1, done) stream 1 message 1 "/m".
        assert_eq!(&y[12..24], &Header::data(Flags::NONE, 1, 6).encode());
        assert_eq!(&y[24..30], &[0x03, 1, 1, 2, b'/', b'm']);
        // Data stream 1: drpc Message (kind 2, done) stream 1 message 2, empty body.
        assert_eq!(&y[30..42], &Header::data(Flags::NONE, 1, 4).encode());
        assert_eq!(&y[42..], &[0x05, 1, 2, 0]);
        assert_eq!(w.send_window(), INITIAL_WINDOW - 10);
    }

    #[test]
    fn large_output_is_split_into_bounded_frames() {
        let mut w = Wire::with_mask(MASK);
        let req = CoordinateRequest {
            add_tunnel: Some(proto::tailnet::v2::coordinate_request::Tunnel {
                id: bytes::Bytes::from(vec![7u8; 5000]),
            }),
            ..Default::default()
        };
        for _ in 0..8 {
            assert!(w.queue_request(&req).unwrap());
        }
        w.seal();
        let frames = client_frames(w.output());
        assert!(frames.len() >= 3);
        assert!(frames.iter().all(|f| f.1.len() <= MAX_WS_PAYLOAD));
        let total: usize = frames.iter().map(|f| f.1.len()).sum();
        // yamux header + dRPC header (5) + request (tag, 2-byte length, tunnel of 5003).
        assert_eq!(total, 8 * (12 + 5 + 5006));
    }

    #[test]
    fn send_window_is_respected_and_replenished() {
        let mut w = Wire::with_mask(MASK);
        let req = CoordinateRequest {
            add_tunnel: Some(proto::tailnet::v2::coordinate_request::Tunnel {
                id: bytes::Bytes::from(vec![7u8; 60_000]),
            }),
            ..Default::default()
        };
        let mut sent = 0;
        while w.queue_request(&req).unwrap() {
            sent += 1;
        }
        assert_eq!(sent, 4);
        let before = w.send_window();
        let upd = server_frame(2, &Header::window_update(Flags::NONE, 1, 100_000).encode());
        feed_all(&mut w, &upd, 5).unwrap();
        assert_eq!(w.send_window(), before + 100_000);
        assert!(w.queue_request(&req).unwrap());
    }

    /// Responses split across WebSocket frames and reads at every offset, with yamux pings and a
    /// WebSocket ping in between, and a packet split into two dRPC frames.
    #[test]
    fn parses_responses_across_arbitrary_splits() {
        let mut ystream = Vec::new();
        let push_data = |payload: &[u8], ystream: &mut Vec<u8>| {
            ystream.extend_from_slice(&Header::data(Flags::NONE, 1, payload.len() as u32).encode());
            ystream.extend_from_slice(payload);
        };
        // ACK of our stream open.
        ystream.extend_from_slice(&Header::window_update(Flags::ACK, 1, 0).encode());
        let mut d = Vec::new();
        for (mid, marker) in [(1u64, 1u8), (2, 2)] {
            let body = response(marker).encode_to_vec();
            let mut b = bytes::BytesMut::new();
            drpc::encode_packet(1, mid, Kind::Message, &body, &mut b);
            d.extend_from_slice(&b);
        }
        // Message 3 split in two frames by hand.
        let body = response(3).encode_to_vec();
        let (a, b) = body.split_at(body.len() / 2);
        for (done, part) in [(false, a), (true, b)] {
            d.push((2 << 1) | u8::from(done));
            drpc::put_varint(1, &mut d);
            drpc::put_varint(3, &mut d);
            drpc::put_varint(part.len() as u64, &mut d);
            d.extend_from_slice(part);
        }
        let (d1, d2) = d.split_at(d.len() / 3);
        push_data(d1, &mut ystream);
        ystream.extend_from_slice(&Header::ping(Flags::SYN, 0xabcd).encode());
        // Data on a stream we never opened is skipped.
        ystream.extend_from_slice(&Header::data(Flags::NONE, 3, 5).encode());
        ystream.extend_from_slice(b"zzzzz");
        push_data(d2, &mut ystream);
        // Cut the yamux byte stream into WebSocket messages of 7 bytes, with a ping in the middle.
        let mut wire_bytes = Vec::new();
        for (i, ch) in ystream.chunks(7).enumerate() {
            if i == 3 {
                wire_bytes.extend_from_slice(&server_frame(9, b"hi"));
            }
            wire_bytes.extend_from_slice(&server_frame(2, ch));
        }
        for step in [1, 2, 3, 13, 64, wire_bytes.len()] {
            let mut w = Wire::with_mask(MASK);
            let got = feed_all(&mut w, &wire_bytes, step).unwrap();
            assert_eq!(got, vec![1, 2, 3], "step {step}");
            // Pong first (queued straight into the output), then the yamux ping ACK at seal.
            w.seal();
            let frames = client_frames(w.output());
            assert_eq!(frames[0], (0xA, b"hi".to_vec()));
            assert_eq!(frames[1].0, 2);
            assert_eq!(
                frames[1].1,
                Header::ping(Flags::ACK, 0xabcd).encode().to_vec()
            );
        }
    }

    #[test]
    fn window_update_after_half_the_window() {
        let mut w = Wire::with_mask(MASK);
        let body = response(9).encode_to_vec();
        let mut b = bytes::BytesMut::new();
        let mut n = 0;
        let mut mid = 1;
        while b.len() < (INITIAL_WINDOW / 2) as usize {
            drpc::encode_packet(1, mid, Kind::Message, &body, &mut b);
            mid += 1;
            n += 1;
        }
        let mut y = Header::data(Flags::NONE, 1, b.len() as u32)
            .encode()
            .to_vec();
        y.extend_from_slice(&b);
        let got = feed_all(&mut w, &server_frame(2, &y), 4096).unwrap();
        assert_eq!(got.len(), n);
        w.seal();
        let frames = client_frames(w.output());
        assert_eq!(frames.len(), 1);
        assert_eq!(
            frames[0].1,
            Header::window_update(Flags::NONE, 1, b.len() as u32)
                .encode()
                .to_vec()
        );
    }

    #[test]
    fn every_end_of_stream_is_an_error() {
        let ends: Vec<(Vec<u8>, &str)> = vec![
            (server_frame(8, &1000u16.to_be_bytes()), "websocket closed"),
            (server_frame(2, &Header::go_away(0).encode()), "go away"),
            (
                server_frame(2, &Header::window_update(Flags::RST, 1, 0).encode()),
                "reset",
            ),
            (
                server_frame(2, &Header::data(Flags::FIN, 1, 0).encode()),
                "closed by the server",
            ),
            (server_frame(1, b"x"), "text"),
            (vec![0x82, 0x81, 0, 0, 0, 0, 0], "masked"),
            (
                server_frame(2, &[1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                "version",
            ),
        ];
        for (bytes, want) in ends {
            let mut w = Wire::with_mask(MASK);
            let e = feed_all(&mut w, &bytes, 3).unwrap_err();
            assert!(e.to_string().contains(want), "{e} vs {want}");
        }
        // dRPC Error / CloseSend packets.
        for (kind, body, want) in [
            (Kind::Error, drpc::encode_error(3, "nope").to_vec(), "nope"),
            (Kind::CloseSend, Vec::new(), "drpc stream closed"),
            (Kind::Close, Vec::new(), "drpc stream closed"),
        ] {
            let mut b = bytes::BytesMut::new();
            drpc::encode_packet(1, 1, kind, &body, &mut b);
            let mut y = Header::data(Flags::NONE, 1, b.len() as u32)
                .encode()
                .to_vec();
            y.extend_from_slice(&b);
            let mut w = Wire::with_mask(MASK);
            let e = feed_all(&mut w, &server_frame(2, &y), 2).unwrap_err();
            assert!(e.to_string().contains(want), "{e} vs {want}");
        }
    }

    #[test]
    fn response_before_fin_is_delivered() {
        let body = response(5).encode_to_vec();
        let mut b = bytes::BytesMut::new();
        drpc::encode_packet(1, 1, Kind::Message, &body, &mut b);
        let mut y = Header::data(Flags::FIN, 1, b.len() as u32)
            .encode()
            .to_vec();
        y.extend_from_slice(&b);
        let mut w = Wire::with_mask(MASK);
        let mut got = Vec::new();
        let e = w
            .feed(&server_frame(2, &y), &mut |r| {
                got.push(r.peer_updates[0].id[0])
            })
            .unwrap_err();
        assert_eq!(got, vec![5]);
        assert!(matches!(e, LeanError::StreamClosed));
    }

    /// End to end against a tiny in-test WebSocket server on 127.0.0.1 speaking the server side
    /// by hand: checks the upgrade, our masking and the first frames on a real socket.
    #[tokio::test]
    async fn connects_and_exchanges_over_loopback() {
        use tokio::io::AsyncReadExt;
        let ln = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = ln.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = ln.accept().await.unwrap();
            let mut head = Vec::new();
            while find_head_end(&head).is_none() {
                let mut b = [0u8; 512];
                let n = s.read(&mut b).await.unwrap();
                head.extend_from_slice(&b[..n]);
            }
            let text = String::from_utf8(head).unwrap();
            assert!(text.contains("Coder-Session-Token: t0k\r\n"));
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                .await
                .unwrap();
            // Read the client's first write: one masked frame with open + invoke.
            let mut b = vec![0u8; 4096];
            let n = s.read(&mut b).await.unwrap();
            let frames = client_frames(&b[..n]);
            let body = response(42).encode_to_vec();
            let mut d = bytes::BytesMut::new();
            drpc::encode_packet(1, 1, Kind::Message, &body, &mut d);
            let mut y = Header::window_update(Flags::ACK, 1, 0).encode().to_vec();
            y.extend_from_slice(&Header::data(Flags::NONE, 1, d.len() as u32).encode());
            y.extend_from_slice(&d);
            s.write_all(&server_frame(2, &y)).await.unwrap();
            frames
        });
        let mut c = LeanConn::connect(&addr, "/x", Some("t0k")).await.unwrap();
        c.wire.queue_open("/coder.tailnet.v2.Tailnet/Coordinate");
        c.flush().await.unwrap();
        let mut got = Vec::new();
        while got.is_empty() {
            c.read().await.unwrap();
            c.process(&mut |r| got.push(r.peer_updates[0].id[0]))
                .unwrap();
        }
        assert_eq!(got, vec![42]);
        let frames = server.await.unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(
            &frames[0].1[..12],
            &Header::window_update(Flags::SYN, 1, 0).encode()
        );
    }
}
