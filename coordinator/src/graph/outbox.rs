//! A connection's bounded response queue and its receiving end.
//!
//! Why: the graph must never wait for a slow peer. Pushing is a non-blocking `try_push` into a
//! bounded `VecDeque`; a full queue is reported to the graph, which removes that peer. Closing is a
//! separate slot, so a close always gets through even when the queue is full.
//!
//! Never hold the outbox mutex across `.await` (it is a leaf lock: nothing else is locked while it
//! is held, and [`PeerReceiver::recv`] releases it before waiting).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use proto::tailnet::v2::CoordinateResponse;
use tokio::sync::Notify;

/// Why a push failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue is at capacity.
    Full,
    /// The stream is closed or its receiver is gone.
    Closed,
}

#[derive(Debug)]
enum CloseState {
    Open,
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
}

#[derive(Debug)]
pub(crate) struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    capacity: usize,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                close: CloseState::Open,
                receiver_gone: false,
            }),
            notify: Notify::new(),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one response without waiting.
    pub(crate) fn try_push(&self, resp: CoordinateResponse) -> Result<(), PushError> {
        {
            let mut g = self.lock();
            if g.receiver_gone || !matches!(g.close, CloseState::Open) {
                return Err(PushError::Closed);
            }
            if g.queue.len() >= self.capacity {
                return Err(PushError::Full);
            }
            g.queue.push_back(resp);
        }
        self.notify.notify_one();
        Ok(())
    }

    /// Ends the stream: pending responses are discarded, `error` (if any) is the last response.
    /// The first close wins.
    pub(crate) fn close(&self, error: Option<String>) {
        {
            let mut g = self.lock();
            if !matches!(g.close, CloseState::Open) {
                return;
            }
            g.queue.clear();
            g.close = CloseState::Closing(error);
        }
        self.notify.notify_one();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().queue.len()
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
            CloseState::Open => {
                g.close = CloseState::Open;
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
        assert_eq!(ob.try_push(resp("c")), Err(PushError::Full));
        assert_eq!(ob.len(), 2);
        assert_eq!(rx.recv().await.map(|r| r.error), Some("a".into()));
        ob.close(Some("bye".into()));
        assert_eq!(ob.try_push(resp("d")), Err(PushError::Closed));
        // pending "b" discarded; the final error is delivered, then None forever.
        assert_eq!(rx.recv().await.map(|r| r.error), Some("bye".into()));
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.recv().await, None);
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
