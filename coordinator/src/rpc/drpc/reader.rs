//! Reads dRPC packets off one yamux stream ([`PacketReader`]): frames through
//! `proto::drpc::PacketAssembler`, the raw prefix kept for [`Handler::take_over`], and every byte
//! held charged to the yamux session's buffered-bytes limit. It never buffers more than one packet
//! (≤ 4 MiB) plus one read chunk.

use super::*;

/// Reads packets off one yamux stream. Cancel-safe: `next` only awaits inside `read_buf`.
pub(super) struct PacketReader {
    pub(super) rd: StreamReader,
    pub(super) buf: BytesMut,
    pub(super) asm: PacketAssembler,
    pub(super) raw: Option<BytesMut>,
    /// `buf`, the partial packet in `asm` and `raw`, charged to the session.
    pub(super) held: HeldBytes,
}

pub(super) enum ReadError {
    Eof,
    Io(std::io::Error),
    Protocol(DrpcError),
}

impl PacketReader {
    pub(super) fn new(rd: StreamReader, keep_raw: bool) -> Self {
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
    pub(super) fn account(&mut self) -> Result<(), ReadError> {
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
    pub(super) fn next_buffered(&mut self) -> Result<Option<(Packet, HeldBytes)>, ReadError> {
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
    pub(super) async fn next(&mut self) -> Result<(Packet, HeldBytes), ReadError> {
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

pub(super) fn log_protocol_error(metrics: &MetricsRef, stream: u32, err: &DrpcError) {
    count(metrics, |m| &m.drpc_protocol_errors);
    tracing::info!(yamux_stream = stream, error = %err, "drpc: protocol error, closing transport");
}
