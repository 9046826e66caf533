//! The server side: [`serve`] accepts yamux streams and runs one dRPC connection per stream
//! ([`serve_stream`]), dispatching invokes to a [`Handler`] and polling the active call in the same
//! task as the transport's reader. A protocol error resets only its own yamux stream.

use super::*;

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
    let mut pending: Option<Box<Inbound>> = None;
    // A packet already parsed from the read buffer (see below), processed in its turn.
    let mut ahead: Option<(Packet, HeldBytes)> = None;

    loop {
        let running = current.as_ref().is_some_and(|c| c.fut.is_some());
        let deliver_to = current.as_ref().map(|c| c.in_tx.inbox());
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
            room = async {
                match deliver_to.as_ref() {
                    Some(inbox) => std::future::poll_fn(|cx| inbox.poll_room(cx)).await,
                    None => false,
                }
            }, if pending.is_some() => {
                if let (true, Some(inbox), Some(item)) = (room, deliver_to.as_ref(), pending.take()) {
                    inbox.push(item);
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

pub(super) async fn start_call(
    handler: &Arc<dyn Handler>,
    config: &DrpcConfig,
    stream_id: u64,
    method: String,
    metadata: BTreeMap<String, String>,
    out: Arc<TransportWriter>,
) -> Current {
    let shared = CallShared::new();
    let (in_tx, in_rx) = Inbox::bounded(config.recv_queue);
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
pub(super) async fn finish_call(sender: Option<RpcSender>, res: Result<(), RpcError>) {
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
