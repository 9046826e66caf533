//! The client side: one yamux stream per call with dRPC stream id 1, exactly the call patterns of
//! Go's `drpcconn` as Coder's `drpcsdk.MultiplexedConn` uses them ([`RpcClient`], [`open_call`],
//! [`invoke_unary_on`]).

use super::*;

/// dRPC client over a yamux client session: one yamux stream per call, dRPC stream id 1, exactly
/// like Coder's `drpcsdk.MultiplexedConn`.
#[derive(Debug)]
pub struct RpcClient {
    pub(super) session: Session,
    pub(super) config: DrpcConfig,
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

    pub(super) async fn start(&self, method: &str) -> Result<RpcStream, RpcError> {
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

pub(super) async fn open_client_call(
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
    let shared = CallShared::new();
    let (in_tx, in_rx) = Inbox::bounded(config.recv_queue);
    let reader = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(client_reader(
        PacketReader::new(rd, false),
        in_tx,
        shared.clone(),
        out.clone(),
        config.metrics.clone(),
    )));
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
            shared: shared.clone(),
            done: false,
        },
        _client_guard: Some(ClientGuard {
            shared,
            _reader: reader,
        }),
    })
}

pub(super) async fn client_reader(
    mut reader: PacketReader,
    in_tx: InboxSender,
    shared: Arc<CallShared>,
    out: Arc<TransportWriter>,
    metrics: MetricsRef,
) {
    let yamux_id = reader.rd.id();
    loop {
        let pkt = reader.next().await;
        let (pkt, held) = match pkt {
            Ok(p) => p,
            Err(ReadError::Eof) | Err(ReadError::Io(_)) => break,
            Err(ReadError::Protocol(e)) => {
                log_protocol_error(&metrics, yamux_id, &e);
                in_tx.try_send(Box::new(Inbound::Error(RpcError::Protocol(e.to_string()))));
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
                in_tx.try_send(Box::new(Inbound::Error(RpcError::Protocol(e.to_string()))));
                out.abort().await;
                break;
            }
        };
        if let Some(item) = item {
            if in_tx.send(item).await.is_err() {
                break;
            }
        }
    }
    // The receiver sees the channel close: `None` if the call was terminated, else Canceled.
    shared.cancel.cancel();
}
