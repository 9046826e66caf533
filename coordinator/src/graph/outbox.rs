//! A connection's bounded response queue, its de-duplication memory, and its receiving end.
//!
//! Why: the graph must never wait for a slow peer. Pushing is a non-blocking append to a bounded
//! `VecDeque`; a full queue marks the connection *failed* (it refuses every later push, so the
//! receiver never sees a gap, only a prefix of its stream) and is reported to the graph, which
//! then removes that peer. Closing is a separate slot, so a close always gets through even when the
//! queue is full.
//!
//! The de-duplication memory (Coder's `peer.sent`: the last node this connection was told about
//! each other peer) lives here, on the receiving side, so that a push *about* peer X can be decided
//! and appended in one step while the graph holds only X's shard lock (see [`super`]). Every entry
//! `sent[X]` is only ever read or written while X's shard lock is held, which is what makes the
//! decisions about X follow X's own order of changes.
//!
//! Never hold the outbox mutex across `.await`, and never take another lock while holding it: it
//! is the leaf of the graph's lock order. [`PeerReceiver::recv`] releases it before waiting.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::coordinate_response::PeerUpdate;
use proto::tailnet::v2::{CoordinateResponse, Node};
use tokio::sync::Notify;
use uuid::Uuid;

/// Why a push failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue is at capacity. The outbox is now failed; the caller must have the peer kicked.
    Full,
    /// The stream is closed or failed, or its receiver is gone: nothing to do.
    Closed,
}

#[derive(Debug)]
enum CloseState {
    Open,
    /// A push found the queue full: later pushes are refused, the receiver may still drain what is
    /// queued, and the graph is about to remove the peer (which then closes the stream).
    Failed,
    /// Closed; `Some(error)` still has to be handed to the receiver.
    Closing(Option<String>),
    /// Closed and the final error (if any) delivered: the receiver yields `None` from now on.
    Done,
}

#[derive(Debug)]
struct Inner {
    queue: VecDeque<CoordinateResponse>,
    close: CloseState,
    receiver_gone: bool,
    /// Last node sent as NODE about each peer (Coder's `peer.sent`).
    sent: HashMap<Uuid, Arc<Node>>,
}

impl Inner {
    fn refuses(&self) -> bool {
        self.receiver_gone || !matches!(self.close, CloseState::Open)
    }

    /// Appends, or marks the outbox failed if there is no room.
    fn append(&mut self, resp: CoordinateResponse, capacity: usize) -> Result<(), PushError> {
        if self.queue.len() >= capacity {
            self.close = CloseState::Failed;
            return Err(PushError::Full);
        }
        self.queue.push_back(resp);
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    capacity: usize,
}

/// One update about one peer, before de-duplication.
pub(crate) struct About<'a> {
    /// The peer the update is about.
    pub(crate) id: Uuid,
    /// Its id as wire bytes (shared, so cloning is a reference-count bump).
    pub(crate) id_bytes: &'a Bytes,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                close: CloseState::Open,
                receiver_gone: false,
                sent: HashMap::new(),
            }),
            notify: Notify::new(),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one response without waiting (errors are not de-duplicated).
    pub(crate) fn try_push(&self, resp: CoordinateResponse) -> Result<(), PushError> {
        {
            let mut g = self.lock();
            if g.refuses() {
                return Err(PushError::Closed);
            }
            g.append(resp, self.capacity)?;
        }
        self.notify.notify_one();
        Ok(())
    }

    /// Tells this connection `kind` about `about`, subject to Coder's `storeMappingLocked` rules
    /// (mirrors [`super::core`]'s `store_mapping`): NODE only if it differs from the last node sent
    /// about that peer; LOST/DISCONNECTED only if a node was sent (and forgets it);
    /// READY_FOR_HANDSHAKE always. Returns whether an update was queued.
    ///
    /// The caller must hold the shard lock of `about.id`.
    pub(crate) fn push_mapping(
        &self,
        about: &About<'_>,
        kind: Kind,
        node: Option<&Arc<Node>>,
        reason: &str,
    ) -> Result<bool, PushError> {
        {
            let mut g = self.lock();
            if g.refuses() {
                return Err(PushError::Closed);
            }
            let wire_node = match kind {
                Kind::Lost | Kind::Disconnected => {
                    if !g.sent.contains_key(&about.id) {
                        return Ok(false);
                    }
                    None
                }
                Kind::Node => {
                    let Some(node) = node else { return Ok(false) };
                    if g.sent
                        .get(&about.id)
                        .is_some_and(|s| Arc::ptr_eq(s, node) || **s == **node)
                    {
                        return Ok(false);
                    }
                    Some((**node).clone())
                }
                Kind::ReadyForHandshake | Kind::Unspecified => None,
            };
            let resp = CoordinateResponse {
                peer_updates: vec![PeerUpdate {
                    id: about.id_bytes.clone(),
                    node: wire_node,
                    kind: kind as i32,
                    reason: reason.to_owned(),
                }],
                error: String::new(),
            };
            g.append(resp, self.capacity)?;
            // Only a queued update changes what the receiver knows.
            match kind {
                Kind::Lost | Kind::Disconnected => {
                    g.sent.remove(&about.id);
                }
                Kind::Node => {
                    if let Some(node) = node {
                        g.sent.insert(about.id, node.clone());
                    }
                }
                Kind::ReadyForHandshake | Kind::Unspecified => {}
            }
        }
        self.notify.notify_one();
        Ok(true)
    }

    /// The "init" batch of a new connection: NODE about each `(peer, node)` not already sent,
    /// queued as responses of at most `chunk` updates each. Returns the number of updates queued.
    ///
    /// The caller must hold the shard lock of every peer in `nodes`.
    pub(crate) fn push_batch(
        &self,
        nodes: Vec<(Uuid, Bytes, Arc<Node>)>,
        reason: &str,
        chunk: usize,
    ) -> Result<usize, PushError> {
        let chunk = chunk.max(1);
        let mut queued = 0;
        {
            let mut g = self.lock();
            if g.refuses() {
                return Err(PushError::Closed);
            }
            let mut updates = Vec::with_capacity(nodes.len());
            for (id, id_bytes, node) in nodes {
                if g.sent.get(&id).is_some_and(|s| **s == *node) {
                    continue;
                }
                updates.push(PeerUpdate {
                    id: id_bytes,
                    node: Some((*node).clone()),
                    kind: Kind::Node as i32,
                    reason: reason.to_owned(),
                });
                g.sent.insert(id, node);
            }
            while !updates.is_empty() {
                let rest = if updates.len() > chunk {
                    updates.split_off(chunk)
                } else {
                    Vec::new()
                };
                let n = updates.len();
                g.append(
                    CoordinateResponse {
                        peer_updates: updates,
                        error: String::new(),
                    },
                    self.capacity,
                )?;
                queued += n;
                updates = rest;
            }
        }
        if queued > 0 {
            self.notify.notify_one();
        }
        Ok(queued)
    }

    /// Ends the stream: pending responses are discarded, `error` (if any) is the last response.
    /// The first close wins (a failed outbox can still be closed).
    pub(crate) fn close(&self, error: Option<String>) {
        {
            let mut g = self.lock();
            if !matches!(g.close, CloseState::Open | CloseState::Failed) {
                return;
            }
            g.queue.clear();
            g.sent.clear();
            g.close = CloseState::Closing(error);
        }
        self.notify.notify_one();
    }

    /// Whether a push found the queue full and the stream has not been closed yet.
    pub(crate) fn is_failed(&self) -> bool {
        matches!(self.lock().close, CloseState::Failed)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// The de-duplication memory (tests compare it with what the receiver was told).
    #[cfg(test)]
    pub(crate) fn sent_snapshot(&self) -> HashMap<Uuid, Node> {
        self.lock()
            .sent
            .iter()
            .map(|(k, v)| (*k, (**v).clone()))
            .collect()
    }
}

/// Why [`PeerReceiver::try_recv`] returned nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing queued right now.
    Empty,
    /// The stream has ended; the session must close it.
    Ended,
}

/// The receiving end of a connection's responses. `recv().await` yields responses in order, then
/// the final error (if the stream was closed with one), then `None` forever: `None` means the
/// session must end the stream.
#[derive(Debug)]
pub struct PeerReceiver {
    outbox: Arc<Outbox>,
}

impl PeerReceiver {
    pub(crate) fn new(outbox: Arc<Outbox>) -> Self {
        Self { outbox }
    }

    /// Takes the next response without waiting.
    pub fn try_recv(&mut self) -> Result<CoordinateResponse, TryRecvError> {
        let mut g = self.outbox.lock();
        match std::mem::replace(&mut g.close, CloseState::Done) {
            state @ (CloseState::Open | CloseState::Failed) => {
                g.close = state;
                g.queue.pop_front().ok_or(TryRecvError::Empty)
            }
            CloseState::Closing(Some(error)) => Ok(CoordinateResponse {
                peer_updates: Vec::new(),
                error,
            }),
            CloseState::Closing(None) | CloseState::Done => Err(TryRecvError::Ended),
        }
    }

    /// Waits for the next response; `None` when the stream has ended. Cancel-safe (usable in
    /// `select!`): nothing is taken from the queue unless it is returned.
    pub async fn recv(&mut self) -> Option<CoordinateResponse> {
        loop {
            match self.try_recv() {
                Ok(r) => return Some(r),
                Err(TryRecvError::Ended) => return None,
                Err(TryRecvError::Empty) => {}
            }
            // A push or close between try_recv and here leaves a permit (notify_one), so this
            // wakes up immediately instead of missing it.
            self.outbox.notify.notified().await;
        }
    }
}

impl Drop for PeerReceiver {
    fn drop(&mut self) {
        let mut g = self.outbox.lock();
        g.receiver_gone = true;
        g.queue.clear();
        g.sent.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn resp(e: &str) -> CoordinateResponse {
        CoordinateResponse {
            peer_updates: vec![],
            error: e.into(),
        }
    }

    #[tokio::test]
    async fn push_recv_close() {
        let ob = Outbox::new(2);
        let mut rx = PeerReceiver::new(ob.clone());
        assert_eq!(ob.try_push(resp("a")), Ok(()));
        assert_eq!(ob.try_push(resp("b")), Ok(()));
        assert_eq!(ob.len(), 2);
        assert_eq!(rx.recv().await.map(|r| r.error), Some("a".into()));
        ob.close(Some("bye".into()));
        assert_eq!(ob.try_push(resp("d")), Err(PushError::Closed));
        // pending "b" discarded; the final error is delivered, then None forever.
        assert_eq!(rx.recv().await.map(|r| r.error), Some("bye".into()));
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.recv().await, None);
    }

    #[test]
    fn full_queue_fails_until_closed() {
        let ob = Outbox::new(2);
        let mut rx = PeerReceiver::new(ob.clone());
        assert_eq!(ob.try_push(resp("a")), Ok(()));
        assert_eq!(ob.try_push(resp("b")), Ok(()));
        assert!(!ob.is_failed());
        assert_eq!(ob.try_push(resp("c")), Err(PushError::Full));
        assert!(ob.is_failed());
        // Failed: later pushes are refused even after the receiver makes room, so the receiver
        // only ever sees a prefix of its stream.
        assert_eq!(rx.try_recv().map(|r| r.error), Ok("a".into()));
        assert_eq!(ob.try_push(resp("d")), Err(PushError::Closed));
        assert_eq!(rx.try_recv().map(|r| r.error), Ok("b".into()));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        ob.close(None);
        assert!(!ob.is_failed());
        assert_eq!(rx.try_recv(), Err(TryRecvError::Ended));
    }

    #[test]
    fn mapping_deduplicates() {
        let ob = Outbox::new(16);
        let mut rx = PeerReceiver::new(ob.clone());
        let id = Uuid::from_u128(5);
        let id_bytes = Bytes::copy_from_slice(id.as_bytes());
        let about = About {
            id,
            id_bytes: &id_bytes,
        };
        let n1 = Arc::new(Node {
            preferred_derp: 1,
            ..Default::default()
        });
        let n1b = Arc::new((*n1).clone());
        // Nothing announced yet: LOST says nothing.
        assert_eq!(ob.push_mapping(&about, Kind::Lost, None, "lost"), Ok(false));
        assert_eq!(
            ob.push_mapping(&about, Kind::Node, Some(&n1), "x"),
            Ok(true)
        );
        // Same value (another allocation) is a duplicate.
        assert_eq!(
            ob.push_mapping(&about, Kind::Node, Some(&n1b), "x"),
            Ok(false)
        );
        assert_eq!(
            ob.push_mapping(&about, Kind::ReadyForHandshake, None, ""),
            Ok(true)
        );
        assert_eq!(
            ob.push_mapping(&about, Kind::Disconnected, None, "d"),
            Ok(true)
        );
        assert_eq!(
            ob.push_mapping(&about, Kind::Disconnected, None, "d"),
            Ok(false)
        );
        assert!(ob.sent_snapshot().is_empty());
        let kinds: Vec<i32> = std::iter::from_fn(|| rx.try_recv().ok())
            .flat_map(|r| r.peer_updates)
            .map(|u| u.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![
                Kind::Node as i32,
                Kind::ReadyForHandshake as i32,
                Kind::Disconnected as i32
            ]
        );
    }

    #[test]
    fn batch_is_chunked_and_recorded() {
        let ob = Outbox::new(16);
        let mut rx = PeerReceiver::new(ob.clone());
        let nodes: Vec<_> = (0..5u128)
            .map(|i| {
                let id = Uuid::from_u128(i + 1);
                (
                    id,
                    Bytes::copy_from_slice(id.as_bytes()),
                    Arc::new(Node::default()),
                )
            })
            .collect();
        assert_eq!(ob.push_batch(nodes, "init", 2), Ok(5));
        let sizes: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| r.peer_updates.len())
            .collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        assert_eq!(ob.sent_snapshot().len(), 5);
    }

    #[tokio::test]
    async fn wakes_waiting_receiver() {
        let ob = Outbox::new(4);
        let mut rx = PeerReceiver::new(ob.clone());
        let t = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        ob.try_push(resp("x")).unwrap();
        assert_eq!(t.await.unwrap().map(|r| r.error), Some("x".into()));
    }

    #[tokio::test]
    async fn close_without_error_ends() {
        let ob = Outbox::new(4);
        let mut rx = PeerReceiver::new(ob.clone());
        let t = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        ob.close(None);
        assert_eq!(t.await.unwrap(), None);
    }

    #[test]
    fn dropped_receiver_refuses() {
        let ob = Outbox::new(4);
        drop(PeerReceiver::new(ob.clone()));
        assert_eq!(ob.try_push(resp("x")), Err(PushError::Closed));
    }
}
