//! Reads dRPC packets off one yamux stream ([`PacketReader`]): frames through
//! `proto::drpc::PacketAssembler`, the raw prefix kept for [`Handler::take_over`], and every byte
//! held charged to the yamux session's buffered-bytes limit. It never buffers more than one packet
//! (≤ 4 MiB) plus one read chunk.

use super::*;

/// Reads packets off one yamux stream. Cancel-safe: `next` only awaits in `readable` and
/// `read_buf`, neither of which takes bytes it then loses.
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

/// Packets up to this size are copied out of the read chunk (see [`PacketReader::next_buffered`]);
/// larger ones were read through a buffer grown for them and keep it.
const MAX_SHARED_COPY: usize = 64 * 1024;

impl PacketReader {
    pub(super) fn new(rd: StreamReader, keep_raw: bool) -> Self {
        let held = rd.held_bytes();
        PacketReader {
            rd,
            buf: BytesMut::new(),
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
            if let Some(mut p) = self.asm.push(frame).map_err(ReadError::Protocol)? {
                if p.data.len() <= MAX_SHARED_COPY {
                    // The data is a slice of the read chunk, and the protobuf messages decoded
                    // from it keep zero-copy slices of it (the Node a peer last sent stays in the
                    // graph for the peer's life): copied out, it pins its own few hundred bytes
                    // instead of the whole chunk.
                    p.data = Bytes::copy_from_slice(&p.data);
                }
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
            if self.buf.is_empty() {
                // Nothing partial is held: wait for the next bytes holding no read buffer (most
                // streams are idle most of the time), and allocate a chunk once they are there.
                if self.buf.capacity() > 0 {
                    self.buf = BytesMut::new();
                    self.account()?;
                }
                self.rd.readable().await;
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
