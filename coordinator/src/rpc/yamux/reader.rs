//! The session's reader: parses 12-byte headers with `proto::yamux`, routes frames to streams,
//! enforces receive windows and the buffered-bytes limit, answers pings and accepts inbound
//! streams (ACK before the application sees them). A peer's violation ends only its session.

use super::*;

pub(super) async fn reader_loop<R>(inner: Arc<Inner>, rd: R)
where
    R: AsyncRead + Unpin,
{
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let res = tokio::select! {
        _ = inner.shutdown.cancelled() => Ok(()),
        r = read_frames(&inner, &mut rd) => r,
    };
    if let Err(e) = res {
        inner.shutdown_with(e);
    }
    inner.accept.close();
}

pub(super) async fn read_frames<R>(
    inner: &Arc<Inner>,
    rd: &mut BufReader<R>,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
{
    let mut hdr_buf = [0u8; HEADER_LEN];
    loop {
        if let Err(e) = rd.read_exact(&mut hdr_buf).await {
            return Err(io_end(e));
        }
        let hdr = match Header::decode(&hdr_buf) {
            Ok(Some(h)) => h,
            Ok(None) => return Err(SessionError::Io("short header".into())),
            Err(e) => {
                let msg = match e {
                    HeaderError::BadVersion(_) | HeaderError::BadType(_) => e.to_string(),
                };
                inner.protocol_error(msg.clone());
                return Err(SessionError::Protocol(msg));
            }
        };
        match hdr.typ {
            Type::Data | Type::WindowUpdate => {
                if let Err(msg) = handle_stream_frame(inner, rd, hdr).await? {
                    inner.protocol_error(msg.clone());
                    return Err(SessionError::Protocol(msg));
                }
            }
            Type::Ping => {
                if hdr.flags.contains(Flags::SYN) {
                    inner
                        .send_ctrl(Header::ping(Flags::ACK, hdr.length))
                        .await?;
                } else if hdr.flags.contains(Flags::ACK) {
                    let waiter = inner
                        .pings
                        .lock()
                        .ok()
                        .and_then(|mut p| p.remove(&hdr.length));
                    if let Some(w) = waiter {
                        let _ = w.send(());
                    }
                }
            }
            Type::GoAway => match hdr.length {
                GO_AWAY_NORMAL => inner.remote_goaway.store(true, Ordering::Release),
                GO_AWAY_PROTOCOL_ERROR | GO_AWAY_INTERNAL_ERROR => {
                    tracing::info!(code = hdr.length, "yamux: received go away with error code");
                    return Err(SessionError::RemoteGoAway(hdr.length));
                }
                other => {
                    let msg = format!("unexpected go away code {other}");
                    inner.protocol_error(msg.clone());
                    return Err(SessionError::Protocol(msg));
                }
            },
        }
    }
}

pub(super) fn io_end(e: io::Error) -> SessionError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => SessionError::Eof,
        _ => SessionError::Io(e.to_string()),
    }
}

/// Skips `len` bytes of the transport by consuming them from the reader's own buffer: no scratch
/// space of its own (a 4 KiB scratch array here made every session's driver task 4 KiB larger,
/// for a path that only runs on frames nobody reads).
pub(super) async fn discard<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    mut len: u64,
) -> Result<(), SessionError> {
    while len > 0 {
        let available = rd.fill_buf().await.map_err(io_end)?.len();
        if available == 0 {
            return Err(SessionError::Eof);
        }
        let n = usize::try_from(len).unwrap_or(usize::MAX).min(available);
        rd.consume(n);
        len -= n as u64;
    }
    Ok(())
}

/// Handles a Data or WindowUpdate frame. Outer `Err` = transport/session failure; inner `Err` =
/// a peer protocol violation (the caller sends GoAway(protocol error)).
pub(super) async fn handle_stream_frame<R>(
    inner: &Arc<Inner>,
    rd: &mut BufReader<R>,
    hdr: Header,
) -> Result<Result<(), String>, SessionError>
where
    R: AsyncRead + Unpin,
{
    let id = hdr.stream_id;
    let flags = hdr.flags;
    let data_len = if hdr.typ == Type::Data { hdr.length } else { 0 };
    if id == 0 {
        return Ok(Err(format!("{:?} frame on stream 0", hdr.typ)));
    }

    let mut state = inner.streams().get(&id).cloned();
    if flags.contains(Flags::SYN) {
        if state.is_some() {
            return Ok(Err(format!("duplicate stream {id}")));
        }
        // Streams the peer opens carry the peer's parity: odd from clients, even from servers.
        let peer_parity_odd = !inner.client;
        if (id % 2 == 1) != peer_parity_odd {
            return Ok(Err(format!("stream {id} opened with our own id parity")));
        }
        if data_len > INITIAL_WINDOW {
            return Ok(Err(format!(
                "stream {id}: {data_len} bytes exceed the initial window"
            )));
        }
        match open_inbound(inner, id, hdr).await? {
            Some(s) => state = Some(s),
            None => {
                // Refused with RST; drop any payload.
                discard(rd, u64::from(data_len)).await?;
                return Ok(Ok(()));
            }
        }
    }

    let Some(state) = state else {
        // Frame for a stream we no longer know (closed or reset): discard, like hashicorp.
        if data_len > inner.max_window {
            return Ok(Err(format!(
                "stream {id}: {data_len} bytes exceed the window"
            )));
        }
        discard(rd, u64::from(data_len)).await?;
        return Ok(Ok(()));
    };

    // Read the payload first (bounded by the window check), then update state under the lock.
    let mut payload = None;
    if data_len > 0 {
        let allowed = state.lock().recv_window;
        if data_len > allowed {
            return Ok(Err(format!(
                "stream {id}: received {data_len} bytes with only {allowed} bytes of window"
            )));
        }
        let len = data_len as usize;
        let mut buf = BytesMut::zeroed(len);
        rd.read_exact(&mut buf).await.map_err(io_end)?;
        payload = Some(buf.freeze());
    }

    let mut remove = false;
    let mut over_budget = false;
    {
        let mut g = state.lock();
        if flags.contains(Flags::ACK) {
            g.acked = true;
        }
        if hdr.typ == Type::WindowUpdate && hdr.length > 0 {
            g.send_window = g.send_window.saturating_add(hdr.length);
            if let Some(w) = g.write_waker.take() {
                w.wake();
            }
        }
        if let Some(p) = payload {
            g.recv_window -= data_len;
            if !g.detached && !g.remote_closed && !g.reset {
                // Charged while the stream lock is held so that a concurrent read or drop
                // releases only what was charged.
                over_budget = !inner.add_buffered(p.len());
                g.buffered += p.len();
                g.recv_buf.push_back(p);
                if let Some(w) = g.read_waker.take() {
                    w.wake();
                }
            }
        }
        if flags.contains(Flags::FIN) && !g.remote_closed {
            g.remote_closed = true;
            wake_all(&mut g);
            remove = g.local_closed;
        }
        if flags.contains(Flags::RST) {
            g.reset = true;
            wake_all(&mut g);
            remove = true;
        }
    }
    if remove {
        inner.remove_stream(&state);
    }
    if over_budget {
        inner.over_buffer_limit();
        return Err(inner.end_error());
    }
    Ok(Ok(()))
}

/// Registers an inbound stream, ACKs it and queues it for `accept`. `Ok(None)` = refused (RST).
pub(super) async fn open_inbound(
    inner: &Arc<Inner>,
    id: u32,
    hdr: Header,
) -> Result<Option<Arc<StreamState>>, SessionError> {
    let refuse = |why: &str| {
        count(&inner.config.metrics, |m| &m.yamux_streams_rejected);
        tracing::debug!(stream = id, why, "yamux: refusing inbound stream");
    };
    if inner.local_goaway.load(Ordering::Acquire) {
        refuse("local go away");
        inner
            .send_ctrl(Header::window_update(Flags::RST, id, 0))
            .await?;
        return Ok(None);
    }
    if !inner.accept.has_room(inner.config.accept_backlog) {
        refuse("accept backlog full");
        inner
            .send_ctrl(Header::window_update(Flags::RST, id, 0))
            .await?;
        return Ok(None);
    }
    // The SYN frame's own window delta is applied by the caller like any window update.
    let _ = hdr;
    let state = Arc::new(StreamState::new(id, inner.max_window, INITIAL_WINDOW, true));
    let inserted = {
        let mut map = inner.streams();
        if map.len() >= inner.config.max_streams {
            false
        } else {
            map.insert(id, state.clone());
            true
        }
    };
    if !inserted {
        refuse("stream limit");
        inner
            .send_ctrl(Header::window_update(Flags::RST, id, 0))
            .await?;
        return Ok(None);
    }
    gauge_add(&inner.config.metrics, |m| &m.yamux_streams, 1);
    // ACK before the application can see (and write to) the stream.
    inner
        .send_ctrl(Header::window_update(
            Flags::ACK,
            id,
            inner.max_window - INITIAL_WINDOW,
        ))
        .await?;
    // The window update in the ACK already applies to the payload check that follows, but the
    // payload (if any) was sent against the initial window, which `recv_window` covers.
    // Queued as its state, made a `Stream` when accepted.
    inner.accept.push(state.clone());
    Ok(Some(state))
}
