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
//! **Fan-out cost.** An update fanned out to many receivers is built once, as an [`Update`] behind
//! an `Arc`, and each receiver's queue holds a pointer to it: a push is a de-dup check and a
//! pointer append, never a copy of the node. The owned protobuf response ([`CoordinateResponse`],
//! whose `Node` owns its strings) is built by the *receiver* when it takes the item, outside every
//! graph lock and on the session's own time, and it is dropped (encoded) right after, so the
//! copies of one fan-out are never all alive at once. (Measured: copying the node per receiver
//! under the shard lock made one update to 10,000 receivers ~7× more expensive per receiver than
//! to 100, because 10,000 live copies no longer fit in cache.) Init batches are queued the same
//! way: shared nodes, materialized on receipt.
//!
//! Never hold the outbox mutex across `.await`, and never take another lock while holding it: it
//! is the leaf of the graph's lock order. [`PeerReceiver::recv`] releases it before waiting.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::{Bytes, BytesMut};
use prometheus::{IntCounter, IntGauge};
use proto::tailnet::encode::{put_peer_update, PEER_UPDATES_FIELD};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::coordinate_response::PeerUpdate;
use proto::tailnet::v2::{CoordinateResponse, Node};
use tokio::sync::Notify;
use uuid::Uuid;

use super::shard::Conn;

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

/// One update about one peer, built once per graph operation and shared (behind an `Arc`) by
/// every receiver it is queued for.
#[derive(Debug)]
pub(crate) struct Update {
    /// The peer the update is about.
    pub(crate) about: Uuid,
    /// Its id as wire bytes.
    pub(crate) id_bytes: Bytes,
    pub(crate) kind: Kind,
    /// The node, for [`Kind::Node`] (a NODE update without one is never queued).
    pub(crate) node: Option<Arc<Node>>,
    pub(crate) reason: &'static str,
    /// The update's wire form (one `CoordinateResponse.peer_updates` entry), encoded by the first
    /// receiver that sends it and shared by all the others.
    pub(crate) wire: OnceLock<Bytes>,
    /// What one queue holding this update is charged (see [`update_bytes`]).
    bytes: usize,
}

/// Bytes charged per queued update besides its node and strings (the entry and its pointers).
const UPDATE_OVERHEAD: usize = 32;

/// What a queue is charged for holding an update about a peer: the node's encoded size (what
/// the receiver will copy and send), the id and reason, and [`UPDATE_OVERHEAD`]. A fan-out shares
/// one node among its receivers, so this is an upper bound of what one stalled receiver pins.
fn update_bytes(id_bytes: &Bytes, node: Option<&Node>, reason: &str) -> usize {
    UPDATE_OVERHEAD + id_bytes.len() + reason.len() + node.map_or(0, prost::Message::encoded_len)
}

impl Update {
    /// An update about `about` (its id's wire bytes `id_bytes`); `node` matters only for
    /// [`Kind::Node`].
    pub(crate) fn new(
        about: Uuid,
        id_bytes: Bytes,
        kind: Kind,
        node: Option<Arc<Node>>,
        reason: &'static str,
    ) -> Self {
        let counted = match kind {
            Kind::Node => node.as_deref(),
            _ => None,
        };
        let bytes = update_bytes(&id_bytes, counted, reason);
        Update {
            about,
            id_bytes,
            kind,
            node,
            reason,
            wire: OnceLock::new(),
            bytes,
        }
    }

    fn wire(&self) -> &Bytes {
        self.wire.get_or_init(|| {
            let node = match self.kind {
                Kind::Node => self.node.as_deref(),
                _ => None,
            };
            let mut buf = BytesMut::new();
            put_peer_update(&mut buf, &self.id_bytes, node, self.kind, self.reason);
            buf.freeze()
        })
    }

    /// The wire form (copies the node: done by the receiver, never under a graph lock).
    fn to_wire(&self) -> PeerUpdate {
        PeerUpdate {
            id: self.id_bytes.clone(),
            node: match self.kind {
                Kind::Node => self.node.as_deref().cloned(),
                _ => None,
            },
            kind: self.kind as i32,
            reason: self.reason.to_owned(),
        }
    }
}

/// A chunk of an init batch: `(peer id bytes, node)` pairs, the reason, and the bytes the chunk
/// is charged (the sum of [`update_bytes`] of its entries).
type InitChunk = (Vec<(Bytes, Arc<Node>)>, &'static str, usize);

/// One queued response; each counts once against the queue's capacity. Two words: the rare
/// variants are boxed so that the common one (a shared update) fits inline in [`Queue`].
#[derive(Debug)]
enum Queued {
    /// A complete response (non-fatal errors).
    Response(Box<CoordinateResponse>),
    /// A single update, shared with the other receivers of the same fan-out.
    One(Arc<Update>),
    /// A chunk of an init batch: NODE about each `(peer id bytes, node)`, with the reason.
    Nodes(Box<InitChunk>),
    /// Updates of one remote batch merged into one response while the receiver had not taken
    /// them yet (see [`Outbox::push_mapping`]), with the bytes they are charged.
    Many(Box<(Vec<Arc<Update>>, usize)>),
}

impl Queued {
    /// What a queue is charged for this item: the same value when it is pushed and popped.
    fn bytes(&self) -> usize {
        match self {
            Queued::Response(r) => UPDATE_OVERHEAD + prost::Message::encoded_len(&**r),
            Queued::One(u) => u.bytes,
            Queued::Nodes(b) => b.2,
            Queued::Many(b) => b.1,
        }
    }

    /// The response the session sends.
    fn into_response(self) -> CoordinateResponse {
        let peer_updates = match self {
            Queued::Response(r) => return *r,
            Queued::One(u) => vec![u.to_wire()],
            Queued::Many(b) => b.0.iter().map(|u| u.to_wire()).collect(),
            Queued::Nodes(b) => {
                let (nodes, reason, _) = *b;
                nodes
                    .into_iter()
                    .map(|(id, node)| PeerUpdate {
                        id,
                        node: Some(Arc::unwrap_or_clone(node)),
                        kind: Kind::Node as i32,
                        reason: reason.to_owned(),
                    })
                    .collect()
            }
        };
        CoordinateResponse {
            peer_updates,
            error: String::new(),
        }
    }
}

/// Most updates of one remote batch merged into one queued response (pgcoord's mapper also
/// sends a batch of mappings as one response).
const MERGE_MAX: usize = 1024;

/// How many `sent` entries live inside the outbox before spilling into a hash map.
const SENT_INLINE: usize = 1;

/// Coder's `peer.sent`: the last node sent as NODE about each peer. Most receivers know one peer
/// (a client: its agent), so the first entry lives inside the outbox, on the cache lines every
/// push touches anyway; only a receiver that knows more peers (an agent, a user-scoped client)
/// pays for a hash map. (A fan-out to 10,000 clients otherwise spent two cache misses per client
/// on a one-entry map.) Each peer id is in at most one of the two places.
#[derive(Debug, Default)]
struct Sent {
    inline: [Option<(Uuid, Arc<Node>)>; SENT_INLINE],
    /// Boxed on purpose: one word on the outbox's hot cache lines instead of six; `None` while
    /// empty.
    #[allow(clippy::box_collection)]
    spill: Option<Box<HashMap<Uuid, Arc<Node>>>>,
}

impl Sent {
    fn get(&self, id: &Uuid) -> Option<&Arc<Node>> {
        for (k, v) in self.inline.iter().flatten() {
            if k == id {
                return Some(v);
            }
        }
        self.spill.as_ref()?.get(id)
    }

    fn contains(&self, id: &Uuid) -> bool {
        self.get(id).is_some()
    }

    fn insert(&mut self, id: Uuid, node: Arc<Node>) {
        for (k, v) in self.inline.iter_mut().flatten() {
            if *k == id {
                *v = node;
                return;
            }
        }
        if let Some(v) = self.spill.as_mut().and_then(|m| m.get_mut(&id)) {
            *v = node;
            return;
        }
        match self.inline.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some((id, node)),
            None => {
                self.spill.get_or_insert_with(Box::default).insert(id, node);
            }
        }
    }

    fn remove(&mut self, id: &Uuid) {
        for slot in &mut self.inline {
            if slot.as_ref().is_some_and(|(k, _)| k == id) {
                *slot = None;
                return;
            }
        }
        if let Some(m) = &mut self.spill {
            m.remove(id);
            if m.is_empty() {
                self.spill = None;
            }
        }
    }

    fn clear(&mut self) {
        self.inline = Default::default();
        self.spill = None;
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = (&Uuid, &Arc<Node>)> {
        self.inline
            .iter()
            .flatten()
            .map(|(k, v)| (k, v))
            .chain(self.spill.iter().flat_map(|m| m.iter()))
    }
}

/// A FIFO whose oldest item lives inline. A session drains its queue promptly, so it usually
/// holds zero or one item: pushing and popping then never touch a separate heap buffer (one cache
/// miss less on each side of a large fan-out). Invariant: `first` is older than all of `rest`;
/// `first` is filled only when `rest` is empty.
#[derive(Debug, Default)]
struct Queue {
    first: Option<Queued>,
    rest: VecDeque<Queued>,
}

impl Queue {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn push_back(&mut self, item: Queued) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    fn pop_front(&mut self) -> Option<Queued> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    /// The newest item (not yet taken by the receiver).
    fn back_mut(&mut self) -> Option<&mut Queued> {
        match self.rest.back_mut() {
            Some(b) => Some(b),
            None => self.first.as_mut(),
        }
    }

    fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
        // A queue that once grew keeps no storage after a close.
        self.rest.shrink_to_fit();
    }
}

/// What every outbox of one graph reports: `coordinator_outbox_bytes` (bytes queued in all
/// outboxes) and `coordinator_outbox_byte_overflows_total` (pushes refused by the byte bound).
#[derive(Debug, Clone)]
pub(crate) struct OutboxMetrics {
    pub(crate) bytes: IntGauge,
    pub(crate) byte_overflows: IntCounter,
}

impl OutboxMetrics {
    /// Unregistered metrics (tests of this module).
    #[cfg(test)]
    pub(crate) fn unregistered() -> Self {
        Self {
            bytes: IntGauge::new("coordinator_outbox_bytes", "test")
                .unwrap_or_else(|_| unreachable!()),
            byte_overflows: IntCounter::new("coordinator_outbox_byte_overflows_total", "test")
                .unwrap_or_else(|_| unreachable!()),
        }
    }
}

// `repr(C)`: the fields a push touches (all but the spilled map) sit together, see [`Outbox`].
#[derive(Debug)]
#[repr(C)]
struct Inner {
    queue: Queue,
    /// The sum of [`Queued::bytes`] of what `queue` holds.
    bytes: usize,
    close: CloseState,
    receiver_gone: bool,
    /// The remote batch whose updates the newest queued item holds, while the receiver has not
    /// taken it: a later update of the same batch joins that item (see [`Outbox::push_mapping`]).
    open_batch: Option<u64>,
    /// Last node sent as NODE about each peer (Coder's `peer.sent`).
    sent: Sent,
}

impl Inner {
    fn refuses(&self) -> bool {
        self.receiver_gone || !matches!(self.close, CloseState::Open)
    }

    /// Appends, or marks the outbox failed if there is no room: `limits.capacity` entries, or
    /// `limits.max_bytes` bytes (an item larger than that on its own is still taken by an empty
    /// queue, so that one large node never kicks a receiver that keeps up).
    fn append(&mut self, item: Queued, limits: &Limits) -> Result<(), PushError> {
        self.open_batch = None;
        if self.queue.len() >= limits.capacity {
            self.close = CloseState::Failed;
            return Err(PushError::Full);
        }
        let bytes = item.bytes();
        if self.queue.len() > 0 && self.bytes.saturating_add(bytes) > limits.max_bytes {
            self.close = CloseState::Failed;
            limits.metrics.byte_overflows.inc();
            return Err(PushError::Full);
        }
        self.queue.push_back(item);
        self.bytes += bytes;
        limits.metrics.bytes.add(gauge(bytes));
        Ok(())
    }

    /// Adds `u` of remote batch `batch` to the newest queued item if that item holds updates of
    /// the same batch and has room ([`MERGE_MAX`]); otherwise appends it as an item of its own
    /// that later updates of the batch may join. The byte bound applies as in [`Inner::append`].
    fn append_in_batch(
        &mut self,
        u: &Arc<Update>,
        batch: u64,
        limits: &Limits,
    ) -> Result<(), PushError> {
        if self.open_batch == Some(batch) {
            let bytes = u.bytes;
            if self.bytes.saturating_add(bytes) > limits.max_bytes {
                self.close = CloseState::Failed;
                limits.metrics.byte_overflows.inc();
                return Err(PushError::Full);
            }
            if let Some(back) = self.queue.back_mut() {
                let merged = match back {
                    Queued::One(first) => {
                        let first_bytes = first.bytes;
                        *back = Queued::Many(Box::new((
                            vec![first.clone(), u.clone()],
                            first_bytes + bytes,
                        )));
                        true
                    }
                    Queued::Many(m) if m.0.len() < MERGE_MAX => {
                        m.0.push(u.clone());
                        m.1 += bytes;
                        true
                    }
                    _ => false,
                };
                if merged {
                    self.bytes += bytes;
                    limits.metrics.bytes.add(gauge(bytes));
                    return Ok(());
                }
            }
        }
        self.append(Queued::One(u.clone()), limits)?;
        self.open_batch = Some(batch);
        Ok(())
    }

    fn pop_front(&mut self, metrics: &OutboxMetrics) -> Option<Queued> {
        let item = self.queue.pop_front()?;
        if self.queue.len() == 0 {
            // The receiver took the batch's item: later updates of the batch start a new one.
            self.open_batch = None;
        }
        let bytes = item.bytes();
        self.bytes -= bytes;
        metrics.bytes.sub(gauge(bytes));
        Some(item)
    }

    fn clear_queue(&mut self, metrics: &OutboxMetrics) {
        self.open_batch = None;
        self.queue.clear();
        metrics.bytes.sub(gauge(std::mem::take(&mut self.bytes)));
    }
}

fn gauge(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// An outbox's bounds and where it reports (outside the cache lines a push touches first).
#[derive(Debug)]
struct Limits {
    capacity: usize,
    max_bytes: usize,
    metrics: OutboxMetrics,
}

/// A connection's queue. It is embedded in its [`Conn`] (one allocation per connection, one pointer
/// hop from a tunnel peer's link), and laid out so that what a push touches — the mutex, the
/// queue header, the close state, the inline `sent` entry, the capacity — fits in one aligned
/// pair of cache lines, which [`Outbox::warm`] pulls in ahead of a fan-out.
#[derive(Debug)]
#[repr(C, align(128))]
pub(crate) struct Outbox {
    notify: Notify,
    inner: Mutex<Inner>,
    limits: Limits,
}

impl Outbox {
    /// An outbox of at most `capacity` entries and `max_bytes` bytes (see [`Queued::bytes`]).
    pub(crate) fn new(capacity: usize, max_bytes: usize, metrics: OutboxMetrics) -> Self {
        Self {
            notify: Notify::new(),
            inner: Mutex::new(Inner {
                queue: Queue::default(),
                bytes: 0,
                close: CloseState::Open,
                receiver_gone: false,
                open_batch: None,
                sent: Sent::default(),
            }),
            limits: Limits {
                capacity: capacity.max(1),
                max_bytes: max_bytes.max(1),
                metrics,
            },
        }
    }

    /// Starts loading this outbox's hot cache lines without locking anything (plain loads, no
    /// atomic read-modify-write), so that a fan-out can overlap the cache misses of the next few
    /// receivers with the work on the current one. The locked pushes are full barriers; without
    /// this, every receiver's misses are paid one after another.
    #[inline]
    pub(crate) fn warm(&self) {
        std::hint::black_box(self.inner.is_poisoned());
        std::hint::black_box(self.limits.capacity);
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
            g.append(Queued::Response(Box::new(resp)), &self.limits)?;
        }
        self.notify.notify_one();
        Ok(())
    }

    /// Tells this connection `u`, subject to Coder's `storeMappingLocked` rules (mirrors
    /// [`super::core`]'s `store_mapping`): NODE only if it differs from the last node sent about
    /// that peer; LOST/DISCONNECTED only if a node was sent (and forgets it);
    /// READY_FOR_HANDSHAKE always. Returns whether an update was queued. Queues a pointer to `u`:
    /// no copy of the node is made here.
    ///
    /// `batch`: the remote batch `u` belongs to (a replica's mapper applying what one read
    /// returned). Updates of one batch that the receiver has not taken yet share one queued
    /// response and count once against the capacity, as pgcoord's mapper sends a batch as one
    /// response: a burst of remote peers never kicks a receiver that keeps reading. The byte
    /// bound still applies to every update.
    ///
    /// The caller must hold the shard lock of `u.about`.
    pub(crate) fn push_mapping(
        &self,
        u: &Arc<Update>,
        batch: Option<u64>,
    ) -> Result<bool, PushError> {
        {
            let mut g = self.lock();
            if g.refuses() {
                return Err(PushError::Closed);
            }
            match u.kind {
                Kind::Lost | Kind::Disconnected => {
                    if !g.sent.contains(&u.about) {
                        return Ok(false);
                    }
                }
                Kind::Node => {
                    let Some(node) = &u.node else {
                        return Ok(false);
                    };
                    if g.sent
                        .get(&u.about)
                        .is_some_and(|s| Arc::ptr_eq(s, node) || **s == **node)
                    {
                        return Ok(false);
                    }
                }
                Kind::ReadyForHandshake | Kind::Unspecified => {}
            }
            match batch {
                Some(b) => g.append_in_batch(u, b, &self.limits)?,
                None => g.append(Queued::One(u.clone()), &self.limits)?,
            }
            // Only a queued update changes what the receiver knows.
            match u.kind {
                Kind::Lost | Kind::Disconnected => {
                    g.sent.remove(&u.about);
                }
                Kind::Node => {
                    if let Some(node) = &u.node {
                        g.sent.insert(u.about, node.clone());
                    }
                }
                Kind::ReadyForHandshake | Kind::Unspecified => {}
            }
        }
        self.notify.notify_one();
        Ok(true)
    }

    /// The "init" batch of a new connection: NODE about each `(peer, id bytes, node)` not already
    /// sent, queued as responses of at most `chunk` updates each. Returns the number of updates
    /// queued. The nodes are shared, not copied.
    ///
    /// The caller must hold the shard lock of every peer in `nodes`.
    pub(crate) fn push_batch(
        &self,
        nodes: Vec<(Uuid, Bytes, Arc<Node>)>,
        reason: &'static str,
        chunk: usize,
    ) -> Result<usize, PushError> {
        let chunk = chunk.max(1);
        let mut queued = 0;
        {
            let mut g = self.lock();
            if g.refuses() {
                return Err(PushError::Closed);
            }
            let mut updates = Vec::with_capacity(nodes.len().min(chunk));
            let mut chunk_bytes = 0;
            let mut rest = nodes.into_iter();
            loop {
                let next = rest.next();
                if let Some((id, id_bytes, node)) = next.as_ref() {
                    if g.sent.get(id).is_some_and(|s| **s == **node) {
                        continue;
                    }
                    chunk_bytes += update_bytes(id_bytes, Some(node), reason);
                    updates.push((id_bytes.clone(), node.clone()));
                    g.sent.insert(*id, node.clone());
                }
                if updates.len() == chunk || (next.is_none() && !updates.is_empty()) {
                    let n = updates.len();
                    let nodes = std::mem::take(&mut updates);
                    let bytes = std::mem::take(&mut chunk_bytes);
                    g.append(
                        Queued::Nodes(Box::new((nodes, reason, bytes))),
                        &self.limits,
                    )?;
                    queued += n;
                }
                if next.is_none() {
                    break;
                }
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
            g.clear_queue(&self.limits.metrics);
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

/// What [`PeerReceiver::try_recv_encoded`] took from the queue.
#[derive(Debug)]
pub enum Encoded {
    /// This many updates were appended to the buffer as `CoordinateResponse.peer_updates`
    /// entries: any run of them is a valid `CoordinateResponse` on its own.
    Appended(usize),
    /// A response that must go out as a message of its own (it carries an error text).
    Whole(CoordinateResponse),
}

impl Queued {
    fn encode_into(self, buf: &mut BytesMut) -> Encoded {
        match self {
            Queued::One(u) => {
                buf.extend_from_slice(u.wire());
                Encoded::Appended(1)
            }
            Queued::Many(b) => {
                for u in &b.0 {
                    buf.extend_from_slice(u.wire());
                }
                Encoded::Appended(b.0.len())
            }
            Queued::Nodes(b) => {
                let (nodes, reason, _) = *b;
                for (id, node) in &nodes {
                    put_peer_update(buf, id, Some(node), Kind::Node, reason);
                }
                Encoded::Appended(nodes.len())
            }
            Queued::Response(r) if r.error.is_empty() => {
                for u in &r.peer_updates {
                    prost::encoding::message::encode(PEER_UPDATES_FIELD, u, buf);
                }
                Encoded::Appended(r.peer_updates.len())
            }
            Queued::Response(r) => Encoded::Whole(*r),
        }
    }
}

/// The receiving end of a connection's responses. `recv().await` yields responses in order, then
/// the final error (if the stream was closed with one), then `None` forever: `None` means the
/// session must end the stream.
#[derive(Debug)]
pub struct PeerReceiver {
    /// The connection whose outbox this drains.
    conn: Arc<Conn>,
}

impl PeerReceiver {
    pub(crate) fn new(conn: Arc<Conn>) -> Self {
        Self { conn }
    }

    fn outbox(&self) -> &Outbox {
        &self.conn.outbox
    }

    /// Takes the next queued item, or the final error as a whole response.
    fn take(&mut self) -> Result<Result<Queued, CoordinateResponse>, TryRecvError> {
        let mut g = self.outbox().lock();
        match std::mem::replace(&mut g.close, CloseState::Done) {
            state @ (CloseState::Open | CloseState::Failed) => {
                g.close = state;
                let metrics = &self.conn.outbox.limits.metrics;
                g.pop_front(metrics).map(Ok).ok_or(TryRecvError::Empty)
            }
            CloseState::Closing(Some(error)) => Ok(Err(CoordinateResponse {
                peer_updates: Vec::new(),
                error,
            })),
            CloseState::Closing(None) | CloseState::Done => Err(TryRecvError::Ended),
        }
    }

    /// Takes the next response without waiting. The response is built here, after the outbox
    /// lock is released (see the module doc: fan-outs share one node, copied by each receiver).
    pub fn try_recv(&mut self) -> Result<CoordinateResponse, TryRecvError> {
        Ok(match self.take()? {
            Ok(item) => item.into_response(),
            Err(whole) => whole,
        })
    }

    /// Like [`Self::try_recv`], but appends the next item's updates to `buf` in their wire form
    /// instead of building a response: a shared update is encoded once for all its receivers, and
    /// consecutive calls build one merged `CoordinateResponse` in `buf`.
    pub fn try_recv_encoded(&mut self, buf: &mut BytesMut) -> Result<Encoded, TryRecvError> {
        Ok(match self.take()? {
            Ok(item) => item.encode_into(buf),
            Err(whole) => Encoded::Whole(whole),
        })
    }

    /// Waits for [`Self::try_recv_encoded`] to take something; `None` when the stream has ended.
    /// Cancel-safe: nothing is taken unless it is returned.
    pub async fn recv_encoded(&mut self, buf: &mut BytesMut) -> Option<Encoded> {
        loop {
            match self.try_recv_encoded(buf) {
                Ok(e) => return Some(e),
                Err(TryRecvError::Ended) => return None,
                Err(TryRecvError::Empty) => {}
            }
            self.outbox().notify.notified().await;
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
            self.outbox().notify.notified().await;
        }
    }
}

impl Drop for PeerReceiver {
    fn drop(&mut self) {
        let mut g = self.outbox().lock();
        g.receiver_gone = true;
        g.clear_queue(&self.conn.outbox.limits.metrics);
        g.sent.clear();
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let g = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        g.clear_queue(&self.limits.metrics);
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::authz::CoordinateeAuth;
    use crate::graph::ConnId;

    fn test_conn(capacity: usize) -> Arc<Conn> {
        let id = Uuid::from_u128(99);
        Arc::new(Conn {
            outbox: Outbox::new(capacity, usize::MAX, OutboxMetrics::unregistered()),
            id: ConnId { peer: id, gen: 1 },
            id_bytes: Bytes::copy_from_slice(id.as_bytes()),
            name: "test".into(),
            auth: CoordinateeAuth::Agent { id },
        })
    }

    fn resp(e: &str) -> CoordinateResponse {
        CoordinateResponse {
            peer_updates: vec![],
            error: e.into(),
        }
    }

    #[tokio::test]
    async fn push_recv_close() {
        let c = test_conn(2);
        let ob = &c.outbox;
        let mut rx = PeerReceiver::new(c.clone());
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

    /// Updates of one batch join the newest queued item until the receiver takes it; another
    /// batch, or an update outside a batch, starts a new item; the byte bound still counts every
    /// update; the charge is given back when the merged item is taken.
    #[test]
    fn batch_updates_merge_until_taken_and_stay_under_the_byte_bound() {
        let metrics = OutboxMetrics::unregistered();
        let id = Uuid::from_u128(99);
        let conn = Arc::new(Conn {
            outbox: Outbox::new(2, 10_000, metrics.clone()),
            id: ConnId { peer: id, gen: 1 },
            id_bytes: Bytes::copy_from_slice(id.as_bytes()),
            name: "test".into(),
            auth: CoordinateeAuth::Agent { id },
        });
        let ob = &conn.outbox;
        let mut rx = PeerReceiver::new(conn.clone());
        let rfh = |n: u128| {
            let about = Uuid::from_u128(n);
            Arc::new(Update::new(
                about,
                Bytes::copy_from_slice(about.as_bytes()),
                Kind::ReadyForHandshake,
                None,
                "",
            ))
        };
        // Capacity 2, yet ten updates of batch 7 fit: they are one item.
        for n in 0..10 {
            assert_eq!(ob.push_mapping(&rfh(n), Some(7)), Ok(true));
        }
        assert_eq!(ob.len(), 1);
        let one = rfh(0).bytes;
        assert_eq!(metrics.bytes.get(), (10 * one) as i64);
        // Batch 8 starts an item of its own; then the queue is full for anything else.
        assert_eq!(ob.push_mapping(&rfh(10), Some(8)), Ok(true));
        assert_eq!(ob.push_mapping(&rfh(11), Some(8)), Ok(true));
        assert_eq!(ob.len(), 2);
        let ids = |r: CoordinateResponse| -> Vec<u128> {
            r.peer_updates
                .iter()
                .map(|u| Uuid::from_slice(&u.id).unwrap().as_u128())
                .collect()
        };
        assert_eq!(rx.try_recv().map(ids), Ok((0..10).collect()));
        assert_eq!(rx.try_recv().map(ids), Ok(vec![10, 11]));
        assert_eq!(metrics.bytes.get(), 0);
        // Taken: a later update of batch 8 starts a new item.
        assert_eq!(ob.push_mapping(&rfh(12), Some(8)), Ok(true));
        assert_eq!(ob.push_mapping(&rfh(13), None), Ok(true));
        assert_eq!(ob.len(), 2);
        assert_eq!(rx.try_recv().map(ids), Ok(vec![12]));
        assert_eq!(rx.try_recv().map(ids), Ok(vec![13]));
        // The byte bound: a batch merged into one item still fails the queue past 10,000 bytes.
        let mut n = 100;
        let failed = loop {
            match ob.push_mapping(&rfh(n), Some(9)) {
                Ok(true) => n += 1,
                other => break other,
            }
        };
        assert_eq!(failed, Err(PushError::Full));
        assert!(ob.is_failed());
        assert_eq!(metrics.byte_overflows.get(), 1);
        assert!(((n - 100) as usize) * one <= 10_000);
    }

    #[test]
    fn the_byte_bound_fails_the_queue_and_every_byte_is_given_back() {
        let metrics = OutboxMetrics::unregistered();
        let id = Uuid::from_u128(99);
        let conn = Arc::new(Conn {
            outbox: Outbox::new(100, 1000, metrics.clone()),
            id: ConnId { peer: id, gen: 1 },
            id_bytes: Bytes::copy_from_slice(id.as_bytes()),
            name: "test".into(),
            auth: CoordinateeAuth::Agent { id },
        });
        let ob = &conn.outbox;
        let mut rx = PeerReceiver::new(conn.clone());
        let big = resp(&"x".repeat(1500));
        let charge = UPDATE_OVERHEAD + big.encoded_len();
        // An empty queue takes one item larger than the bound.
        assert_eq!(ob.try_push(big.clone()), Ok(()));
        assert_eq!(metrics.bytes.get(), charge as i64);
        assert_eq!(rx.try_recv().map(|r| r.error.len()), Ok(1500));
        assert_eq!(metrics.bytes.get(), 0);
        // Then items up to the bound, and one more fails the queue (counted).
        let small = resp(&"y".repeat(400));
        assert_eq!(ob.try_push(small.clone()), Ok(()));
        assert_eq!(ob.try_push(small.clone()), Ok(()));
        assert_eq!(metrics.byte_overflows.get(), 0);
        assert_eq!(ob.try_push(small.clone()), Err(PushError::Full));
        assert!(ob.is_failed());
        assert_eq!(metrics.byte_overflows.get(), 1);
        assert_eq!(ob.len(), 2);
        // Closing, and dropping the receiver and the connection, give every byte back.
        ob.close(None);
        assert_eq!(metrics.bytes.get(), 0);
        let c2 = test_conn_with(&metrics);
        c2.outbox.try_push(small.clone()).unwrap();
        assert!(metrics.bytes.get() > 0);
        drop(c2);
        assert_eq!(metrics.bytes.get(), 0);
        drop(rx);
    }

    fn test_conn_with(metrics: &OutboxMetrics) -> Arc<Conn> {
        let id = Uuid::from_u128(98);
        Arc::new(Conn {
            outbox: Outbox::new(10, usize::MAX, metrics.clone()),
            id: ConnId { peer: id, gen: 1 },
            id_bytes: Bytes::copy_from_slice(id.as_bytes()),
            name: "test".into(),
            auth: CoordinateeAuth::Agent { id },
        })
    }

    #[test]
    fn full_queue_fails_until_closed() {
        let c = test_conn(2);
        let ob = &c.outbox;
        let mut rx = PeerReceiver::new(c.clone());
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
        let c = test_conn(16);
        let ob = &c.outbox;
        let mut rx = PeerReceiver::new(c.clone());
        let id = Uuid::from_u128(5);
        let id_bytes = Bytes::copy_from_slice(id.as_bytes());
        let upd = |kind: Kind, node: Option<&Arc<Node>>, reason: &'static str| {
            Arc::new(Update::new(
                id,
                id_bytes.clone(),
                kind,
                node.cloned(),
                reason,
            ))
        };
        let n1 = Arc::new(Node {
            preferred_derp: 1,
            ..Default::default()
        });
        let n1b = Arc::new((*n1).clone());
        // Nothing announced yet: LOST says nothing.
        assert_eq!(
            ob.push_mapping(&upd(Kind::Lost, None, "lost"), None),
            Ok(false)
        );
        assert_eq!(
            ob.push_mapping(&upd(Kind::Node, Some(&n1), "x"), None),
            Ok(true)
        );
        // Same value (another allocation) is a duplicate.
        assert_eq!(
            ob.push_mapping(&upd(Kind::Node, Some(&n1b), "x"), None),
            Ok(false)
        );
        // NODE without a node says nothing.
        assert_eq!(
            ob.push_mapping(&upd(Kind::Node, None, "x"), None),
            Ok(false)
        );
        assert_eq!(
            ob.push_mapping(&upd(Kind::ReadyForHandshake, None, ""), None),
            Ok(true)
        );
        assert_eq!(
            ob.push_mapping(&upd(Kind::Disconnected, None, "d"), None),
            Ok(true)
        );
        assert_eq!(
            ob.push_mapping(&upd(Kind::Disconnected, None, "d"), None),
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
        let c = test_conn(16);
        let ob = &c.outbox;
        let mut rx = PeerReceiver::new(c.clone());
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
        let c = test_conn(4);
        let ob = &c.outbox;
        let mut rx = PeerReceiver::new(c.clone());
        let t = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        ob.try_push(resp("x")).unwrap();
        assert_eq!(t.await.unwrap().map(|r| r.error), Some("x".into()));
    }

    #[tokio::test]
    async fn close_without_error_ends() {
        let c = test_conn(4);
        let ob = &c.outbox;
        let mut rx = PeerReceiver::new(c.clone());
        let t = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        ob.close(None);
        assert_eq!(t.await.unwrap(), None);
    }

    #[test]
    fn queue_keeps_fifo_across_inline_slot() {
        let c = test_conn(8);
        let ob = &c.outbox;
        let mut rx = PeerReceiver::new(c.clone());
        let mut next = 0;
        let mut want = std::collections::VecDeque::new();
        // Interleave pushes and pops so the inline slot empties while the heap part is in use.
        for round in 0..6 {
            for _ in 0..(round % 3 + 1) {
                ob.try_push(resp(&next.to_string())).unwrap();
                want.push_back(next.to_string());
                next += 1;
            }
            for _ in 0..(round % 2 + 1) {
                let got = rx.try_recv().ok().map(|r| r.error);
                assert_eq!(got, want.pop_front());
            }
        }
        while let Some(w) = want.pop_front() {
            assert_eq!(rx.try_recv().map(|r| r.error), Ok(w));
        }
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn sent_spills_and_shrinks() {
        let mut s = Sent::default();
        let n = |d: i32| {
            Arc::new(Node {
                preferred_derp: d,
                ..Default::default()
            })
        };
        let ids: Vec<Uuid> = (1..=4u128).map(Uuid::from_u128).collect();
        for (i, id) in ids.iter().enumerate() {
            s.insert(*id, n(i as i32));
        }
        assert!(s.spill.is_some());
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(s.get(id).map(|x| x.preferred_derp), Some(i as i32));
        }
        // Replacing an entry keeps one entry per id.
        s.insert(ids[0], n(10));
        s.insert(ids[3], n(13));
        assert_eq!(s.iter().count(), 4);
        assert_eq!(s.get(&ids[0]).map(|x| x.preferred_derp), Some(10));
        assert_eq!(s.get(&ids[3]).map(|x| x.preferred_derp), Some(13));
        // Freeing the inline slot lets a new id in there without duplicating a spilled one.
        s.remove(&ids[0]);
        assert!(!s.contains(&ids[0]));
        s.insert(ids[2], n(12));
        assert_eq!(s.iter().count(), 3);
        for id in &ids[1..] {
            s.remove(id);
        }
        assert!(s.spill.is_none());
        assert_eq!(s.iter().count(), 0);
        s.insert(ids[1], n(1));
        s.clear();
        assert!(s.get(&ids[1]).is_none());
    }

    #[test]
    fn dropped_receiver_refuses() {
        let c = test_conn(4);
        let ob = &c.outbox;
        drop(PeerReceiver::new(c.clone()));
        assert_eq!(ob.try_push(resp("x")), Err(PushError::Closed));
    }

    fn sample_node() -> Node {
        Node {
            id: 7,
            preferred_derp: 999,
            key: Bytes::from_static(&[1; 34]),
            disco: "discokey:ab".into(),
            addresses: vec!["fd7a:115c:a1e0::1/128".into(), "100.64.0.1/32".into()],
            allowed_ips: vec!["fd7a:115c:a1e0::1/128".into()],
            endpoints: vec!["192.0.2.1:41641".into(); 3],
            derp_latency: [("1-v4".to_string(), 0.25)].into_iter().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn encoded_receive_matches_the_owned_responses() {
        let id = Uuid::from_u128(5);
        let id_bytes = Bytes::copy_from_slice(id.as_bytes());
        let node = Arc::new(sample_node());
        let fill = |ob: &Outbox| {
            let u = Arc::new(Update::new(
                id,
                id_bytes.clone(),
                Kind::Node,
                Some(node.clone()),
                "node update",
            ));
            ob.push_mapping(&u, None).unwrap();
            let other = Uuid::from_u128(6);
            ob.push_batch(
                vec![(
                    other,
                    Bytes::copy_from_slice(other.as_bytes()),
                    node.clone(),
                )],
                "init",
                8,
            )
            .unwrap();
            ob.try_push(CoordinateResponse {
                peer_updates: vec![PeerUpdate {
                    id: id_bytes.clone(),
                    node: None,
                    kind: Kind::ReadyForHandshake as i32,
                    reason: String::new(),
                }],
                error: String::new(),
            })
            .unwrap();
            ob.try_push(CoordinateResponse {
                peer_updates: Vec::new(),
                error: "refused".into(),
            })
            .unwrap();
        };
        let (a, b) = (test_conn(16), test_conn(16));
        fill(&a.outbox);
        fill(&b.outbox);
        let (mut ra, mut rb) = (PeerReceiver::new(a.clone()), PeerReceiver::new(b.clone()));
        let mut owned = CoordinateResponse::default();
        for _ in 0..3 {
            owned
                .peer_updates
                .extend(ra.try_recv().unwrap().peer_updates);
        }
        let whole_owned = ra.try_recv().unwrap();
        let mut wire = BytesMut::new();
        let mut n = 0;
        for _ in 0..3 {
            match rb.try_recv_encoded(&mut wire).unwrap() {
                Encoded::Appended(k) => n += k,
                Encoded::Whole(r) => panic!("unexpected whole response {r:?}"),
            }
        }
        assert_eq!(n, 3);
        assert_eq!(CoordinateResponse::decode(wire.freeze()).unwrap(), owned);
        match rb.try_recv_encoded(&mut BytesMut::new()).unwrap() {
            Encoded::Whole(r) => assert_eq!(r, whole_owned),
            Encoded::Appended(_) => panic!("an error response must come whole"),
        }
        assert!(matches!(
            rb.try_recv_encoded(&mut BytesMut::new()),
            Err(TryRecvError::Empty)
        ));
    }
}
