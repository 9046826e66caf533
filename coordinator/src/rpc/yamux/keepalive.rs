//! The keepalive loop: a ping every `keepalive_interval`; an unanswered one ends the session
//! (hashicorp's `keepalive`, 30 s / 10 s with Coder's defaults).

use super::*;

pub(super) async fn keepalive_loop(inner: Arc<Inner>) {
    if !inner.config.enable_keepalive || inner.config.keepalive_interval.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(inner.config.keepalive_interval) => {}
        }
        match inner.ping().await {
            Ok(_) => {}
            // Explicit pings fill the table; try again next period.
            Err(SessionError::TooManyPings) => {}
            Err(SessionError::PingTimeout) => {
                count(&inner.config.metrics, |m| &m.yamux_keepalive_timeouts);
                tracing::info!("yamux: keepalive ping not answered in time; closing session");
                inner.shutdown_with(SessionError::KeepAliveTimeout);
                return;
            }
            Err(_) => return,
        }
    }
}
