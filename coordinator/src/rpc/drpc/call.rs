//! One dRPC call as its handler or client sees it: [`RpcStream`], its cloneable [`RpcSender`]
//! and its [`RpcReceiver`], plus the flags both sides of the call share (half-close, terminated,
//! cancelled). Owns no socket, and no task but a client call's reader: sends go through the transport's
//! [`super::writer::TransportWriter`], messages arrive through a bounded queue the transport's
//! reader fills.

use super::*;

#[derive(Default)]
pub(super) struct Flags {
    pub(super) send_closed: bool,
    pub(super) recv_closed: bool,
    pub(super) terminated: bool,
}

pub(super) struct CallShared {
    pub(super) flags: Mutex<Flags>,
    pub(super) cancel: CancellationToken,
}

impl CallShared {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(CallShared {
            flags: Mutex::new(Flags::default()),
            cancel: CancellationToken::new(),
        })
    }

    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Flags) -> R) -> R {
        let mut g = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    pub(super) fn terminate(&self) {
        self.with(|f| {
            f.terminated = true;
            f.send_closed = true;
            f.recv_closed = true;
        });
        self.cancel.cancel();
    }

    pub(super) fn is_terminated(&self) -> bool {
        self.with(|f| f.terminated)
    }
}

/// What a call receives. Sent boxed: the call's queue allocates its storage per call (one per
/// session for the Coordinate stream), and a pointer a slot costs 8 bytes instead of 56.
pub(super) enum Inbound {
    /// A message and its charge against the session's buffered-bytes limit, given back when the
    /// call takes it.
    Message(Bytes, HeldBytes),
    End,
    Error(RpcError),
}

/// The queue from a call's transport reader to the call: at most `cap` items, one producer (the
/// reader, through [`InboxSender`]) and one consumer (the call's [`RpcReceiver`]). Not a tokio
/// channel: a channel allocates its shared state and a first block of slots when it is made
/// (about 800 bytes for every call, 5% of a connected peer); this holds a few pointers once used.
pub(super) struct Inbox {
    st: Mutex<InboxState>,
}

struct InboxState {
    items: VecDeque<Box<Inbound>>,
    cap: usize,
    /// Live [`InboxSender`]s: none left = the call's transport is gone.
    senders: usize,
    receiver_gone: bool,
    recv_waker: Option<Waker>,
    send_waker: Option<Waker>,
}

impl Inbox {
    /// A bounded inbox and its first sender and receiver.
    pub(super) fn bounded(cap: usize) -> (InboxSender, InboxReceiver) {
        let inbox = Arc::new(Inbox {
            st: Mutex::new(InboxState {
                items: VecDeque::new(),
                cap: cap.max(1),
                senders: 1,
                receiver_gone: false,
                recv_waker: None,
                send_waker: None,
            }),
        });
        (InboxSender(inbox.clone()), InboxReceiver(inbox))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ready(true)` once one more item fits, `Ready(false)` once the receiver is gone; only the
    /// one producer queues, so room found stays room until it does.
    pub(super) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut st = self.lock();
        if st.receiver_gone {
            return Poll::Ready(false);
        }
        if st.items.len() < st.cap {
            return Poll::Ready(true);
        }
        st.send_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Queues `item` (after [`Inbox::poll_room`]); false (and the item dropped) when the receiver
    /// is gone.
    pub(super) fn push(&self, item: Box<Inbound>) -> bool {
        let mut st = self.lock();
        if st.receiver_gone {
            drop(st);
            drop(item);
            return false;
        }
        st.items.push_back(item);
        let w = st.recv_waker.take();
        drop(st);
        if let Some(w) = w {
            w.wake();
        }
        true
    }
}

/// The transport reader's end of an [`Inbox`]; the call sees the end of its messages once every
/// sender is dropped.
pub(super) struct InboxSender(Arc<Inbox>);

impl InboxSender {
    /// The inbox itself (no sender of its own: for polling room beside a borrow of the call).
    pub(super) fn inbox(&self) -> Arc<Inbox> {
        self.0.clone()
    }

    /// Waits for room, then queues; `Err` (the item dropped) once the receiver is gone.
    pub(super) async fn send(&self, item: Box<Inbound>) -> Result<(), ()> {
        if std::future::poll_fn(|cx| self.0.poll_room(cx)).await && self.0.push(item) {
            Ok(())
        } else {
            Err(())
        }
    }

    /// Queues if there is room now; the item is dropped otherwise.
    pub(super) fn try_send(&self, item: Box<Inbound>) {
        let has_room = {
            let st = self.0.lock();
            !st.receiver_gone && st.items.len() < st.cap
        };
        if has_room {
            self.0.push(item);
        }
    }
}

impl Clone for InboxSender {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        InboxSender(self.0.clone())
    }
}

impl Drop for InboxSender {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.senders -= 1;
        let w = if st.senders == 0 {
            st.recv_waker.take()
        } else {
            None
        };
        drop(st);
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// The call's end of an [`Inbox`]. Dropping it drops what is queued (giving back its charge
/// against the session's buffered bytes) and fails the sender.
pub(super) struct InboxReceiver(Arc<Inbox>);

impl InboxReceiver {
    /// The next item; `None` once the queue is empty and every sender is gone. Cancel-safe.
    pub(super) async fn recv(&mut self) -> Option<Box<Inbound>> {
        std::future::poll_fn(|cx| {
            let mut st = self.0.lock();
            if let Some(item) = st.items.pop_front() {
                let w = st.send_waker.take();
                drop(st);
                if let Some(w) = w {
                    w.wake();
                }
                return Poll::Ready(Some(item));
            }
            if st.senders == 0 {
                return Poll::Ready(None);
            }
            st.recv_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for InboxReceiver {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.receiver_gone = true;
        let items = std::mem::take(&mut st.items);
        let w = st.send_waker.take();
        drop(st);
        drop(items);
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// Sending side of a call. Cloneable.
#[derive(Clone)]
pub struct RpcSender {
    pub(super) stream_id: u64,
    pub(super) out: Arc<TransportWriter>,
    pub(super) shared: Arc<CallShared>,
}

impl std::fmt::Debug for RpcSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcSender")
            .field("stream_id", &self.stream_id)
            .finish_non_exhaustive()
    }
}

impl RpcSender {
    pub(super) async fn write(
        &self,
        kind: Kind,
        control: bool,
        body: Bytes,
    ) -> Result<(), RpcError> {
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

    pub(super) fn terminate_first(&self) -> bool {
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
    pub(super) rx: InboxReceiver,
    pub(super) shared: Arc<CallShared>,
    pub(super) done: bool,
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
        match self.rx.recv().await.map(|item| *item) {
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
    pub(super) method: String,
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) tx: RpcSender,
    pub(super) rx: RpcReceiver,
    /// Client side: dropping the stream ends the transport.
    pub(super) _client_guard: Option<ClientGuard>,
}

impl std::fmt::Debug for RpcStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcStream")
            .field("method", &self.method)
            .field("stream_id", &self.tx.stream_id)
            .finish_non_exhaustive()
    }
}

/// Owns a client call's reader task ([`super::client::client_reader`]): dropping the call's
/// stream (or its receiving half) cancels the call and ends the task with it.
pub(super) struct ClientGuard {
    pub(super) shared: Arc<CallShared>,
    pub(super) _reader: tokio_util::task::AbortOnDropHandle<()>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        // What the reader does when it ends; it is aborted (by `_reader`'s drop) instead.
        self.shared.cancel.cancel();
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
    pub(super) rx: RpcReceiver,
    pub(super) _client_guard: Option<ClientGuard>,
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

/// The call a transport is serving (server) or carrying (client).
pub(super) struct Current {
    pub(super) stream_id: u64,
    pub(super) shared: Arc<CallShared>,
    pub(super) in_tx: InboxSender,
    pub(super) fut: Option<CallFuture>,
}

/// Maps a packet for the current call to an inbound item (or nothing).
pub(super) fn on_call_packet(
    current: Option<&mut Current>,
    pkt: Packet,
    held: HeldBytes,
) -> Result<Option<Box<Inbound>>, DrpcError> {
    let Some(c) = current else {
        return Ok(None);
    };
    let shared = &c.shared;
    match pkt.kind {
        Kind::Message => {
            let open = shared.with(|f| !f.recv_closed && !f.terminated);
            Ok(open.then(|| Box::new(Inbound::Message(pkt.data, held))))
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
            Ok(deliver.then(|| Box::new(Inbound::End)))
        }
        Kind::Close => {
            let was = shared.is_terminated();
            shared.terminate();
            Ok((!was).then(|| Box::new(Inbound::End)))
        }
        Kind::Error => {
            let was = shared.is_terminated();
            shared.terminate();
            let (code, message) = decode_error(&pkt.data);
            Ok((!was).then(|| Box::new(Inbound::Error(RpcError::Remote { code, message }))))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn end() -> Box<Inbound> {
        Box::new(Inbound::End)
    }

    /// Bounded: the sender waits while `cap` items are queued and resumes when the call takes
    /// one; the call sees what was queued, in order, then the end once every sender is gone.
    #[tokio::test]
    async fn inbox_is_bounded_and_ends_with_its_senders() {
        let (tx, mut rx) = Inbox::bounded(2);
        let tx2 = tx.clone();
        tx.send(end()).await.unwrap();
        tx.send(Box::new(Inbound::Error(RpcError::Canceled)))
            .await
            .unwrap();
        let mut third = Box::pin(tx.send(end()));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(third.as_mut().poll(&mut cx).is_pending(), "full at 2");
        assert!(matches!(rx.recv().await.as_deref(), Some(Inbound::End)));
        assert_eq!(third.as_mut().poll(&mut cx), Poll::Ready(Ok(())));
        assert!(matches!(
            rx.recv().await.as_deref(),
            Some(Inbound::Error(RpcError::Canceled))
        ));
        drop(third);
        drop((tx, tx2));
        assert!(
            matches!(rx.recv().await.as_deref(), Some(Inbound::End)),
            "queued items outlive the senders"
        );
        assert!(rx.recv().await.is_none());
    }

    /// A gone receiver fails the sender, also one waiting for room.
    #[tokio::test]
    async fn inbox_without_receiver_refuses() {
        let (tx, rx) = Inbox::bounded(1);
        tx.send(end()).await.unwrap();
        let mut waiting = Box::pin(tx.send(end()));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        drop(rx);
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Ready(Err(())));
        assert_eq!(tx.send(end()).await, Err(()));
    }
}
