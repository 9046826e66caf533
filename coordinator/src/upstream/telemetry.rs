//! Forwarding a session's `PostTelemetry` calls to the upstream coderd, off the peer's call path.
//!
//! Why: in sidecar mode coderd's telemetry reporter must see the network events Coder's peers
//! post, as if they had posted them to coderd. Forwarding inside the peer's call would make the
//! peer wait for a WebSocket dial to coderd and coderd's answer, and would lose the event when
//! the peer hangs up right after posting (Coder's client posts its ping event and closes at once,
//! which cancelled the dial before it completed). So the peer's call is answered at once and the
//! event goes through a small bounded queue to one pump per session:
//!
//! - **Owned by the session.** [`TelemetryPump::run`] runs inside the session's own future (never
//!   a detached task). When the downstream session ends the pump forwards what is still queued
//!   within [`DRAIN_GRACE`], then ends, which drops the upstream session it dialed; coordinator
//!   shutdown ends it at once. A client of one agent has an `/api/v2/tailnet` session of its own
//!   for this, so its last events still reach coderd after it hung up; agents and Desktop share
//!   their forwarding session, which closes with theirs, so what they queued last is counted as
//!   failed instead (and nothing is dialed for them once they are gone).
//! - **Bounded.** At most [`QUEUE_CAPACITY`] requests wait per session; more are dropped and
//!   counted (`coordinator_upstream_rpc_failures_total{reason="telemetry_dropped"}`). Each
//!   forward is bounded by [`DIAL_TIMEOUT`] for the upstream session and [`CALL_TIMEOUT`] for the
//!   call.
//! - **Never touches the peer's session.** The upstream session comes from
//!   [`UpstreamLink::session_for_telemetry`]: a failed dial or call is counted
//!   (`{reason="telemetry"}`) and logged at debug, and neither closes the downstream session nor
//!   is remembered by the link.
//!
//! This module must never block the peer's call, never queue without bound and never log tokens.

use std::sync::Arc;
use std::time::Duration;

use proto::tailnet::v2::{methods, TelemetryRequest, TelemetryResponse};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::rpc::drpc::{self, DrpcConfig};
use crate::upstream::agent_rpc::UpstreamLink;

/// Most `PostTelemetry` requests waiting to be forwarded per session.
pub const QUEUE_CAPACITY: usize = 8;
/// Bound on getting the upstream session (dialed on first use) for one forward.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one forwarded `PostTelemetry` call once the session is there.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pump may keep forwarding queued requests after its downstream session ended.
pub const DRAIN_GRACE: Duration = Duration::from_secs(15);

/// The session's end of the queue: offers requests without ever waiting.
#[derive(Debug, Clone)]
pub struct TelemetryQueue {
    tx: mpsc::Sender<TelemetryRequest>,
    link: Arc<UpstreamLink>,
}

impl TelemetryQueue {
    /// Queues `req` for forwarding; when the queue is full it is dropped and counted.
    pub fn offer(&self, peer: Uuid, req: TelemetryRequest) {
        if self.tx.try_send(req).is_err() {
            self.link.count_failure("telemetry_dropped");
            tracing::debug!(%peer, "telemetry queue full; event batch dropped");
        }
    }
}

/// Forwards one session's queued telemetry upstream; see the module docs.
#[derive(Debug)]
pub struct TelemetryPump {
    rx: mpsc::Receiver<TelemetryRequest>,
    link: Arc<UpstreamLink>,
    peer: Uuid,
}

/// A queue and its pump for the session of `peer`, forwarding on `link`.
pub fn channel(link: Arc<UpstreamLink>, peer: Uuid) -> (TelemetryQueue, TelemetryPump) {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    (
        TelemetryQueue {
            tx,
            link: link.clone(),
        },
        TelemetryPump { rx, link, peer },
    )
}

impl TelemetryPump {
    /// Forwards until `session_ended` fired and the queue is drained (at most [`DRAIN_GRACE`]
    /// after that), or until `shutdown` fires. What is left unsent is counted as dropped.
    pub async fn run(mut self, session_ended: CancellationToken, shutdown: CancellationToken) {
        let drain_deadline = async {
            session_ended.cancelled().await;
            tokio::time::sleep(DRAIN_GRACE).await;
        };
        tokio::select! {
            _ = self.pump(&session_ended) => {}
            _ = drain_deadline => {}
            _ = shutdown.cancelled() => {}
        }
        self.rx.close();
        let mut left = 0u64;
        while self.rx.try_recv().is_ok() {
            left += 1;
            self.link.count_failure("telemetry_dropped");
        }
        if left > 0 {
            tracing::debug!(peer = %self.peer, left, "session over; queued telemetry dropped");
        }
    }

    async fn pump(&mut self, session_ended: &CancellationToken) {
        loop {
            let req = tokio::select! {
                biased;
                r = self.rx.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
                _ = session_ended.cancelled() => match self.rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => return,
                },
            };
            if let Err(why) = self.forward(&req).await {
                self.link.count_failure("telemetry");
                tracing::debug!(peer = %self.peer, error = %why, "forwarding telemetry to coderd failed");
            }
        }
    }

    async fn forward(&self, req: &TelemetryRequest) -> Result<(), String> {
        let session = tokio::time::timeout(DIAL_TIMEOUT, self.link.session_for_telemetry())
            .await
            .map_err(|_| format!("no upstream session within {DIAL_TIMEOUT:?}"))?
            .map_err(|e| format!("no upstream session: {e}"))?;
        let config = DrpcConfig::default();
        let call = drpc::invoke_unary_on::<_, TelemetryResponse>(
            &session,
            &config,
            methods::POST_TELEMETRY,
            req,
        );
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
