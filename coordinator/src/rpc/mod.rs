//! Coder's v2 transport stack: WebSocket byte stream ([`wsio`]) → yamux session ([`yamux`]) →
//! one dRPC connection per yamux stream ([`drpc`]).
//!
//! Why here and not in `proto`: these layers own tasks, timers and sockets; the pure codecs they use
//! (`proto::yamux`, `proto::drpc`) stay in `proto`. Nothing in this module knows about the peer
//! graph or about Coder's method set: handlers are plugged in through [`drpc::Handler`].
//!
//! Every counter a peer can make us bump lives in [`RpcMetrics`]; it is created unregistered so
//! the crate's metrics owner decides where (and whether) to register it.

pub mod drpc;
pub mod wsio;
pub mod yamux;

use std::sync::Arc;

use prometheus::{IntCounter, IntGauge, Opts, Registry};

/// Counters and gauges for the transport stack. Cheap to clone (prometheus handles are `Arc`s).
#[derive(Clone, Debug)]
pub struct RpcMetrics {
    /// yamux sessions ended by a peer protocol error (bad version/type, window violation, ...).
    pub yamux_protocol_errors: IntCounter,
    /// yamux sessions ended because a keepalive ping was not answered in time.
    pub yamux_keepalive_timeouts: IntCounter,
    /// yamux sessions ended because one frame write was blocked past the write timeout.
    pub yamux_write_timeouts: IntCounter,
    /// Inbound yamux streams refused with RST (accept backlog full, stream limit, after GoAway).
    pub yamux_streams_rejected: IntCounter,
    /// Live yamux sessions.
    pub yamux_sessions: IntGauge,
    /// Live yamux streams.
    pub yamux_streams: IntGauge,
    /// yamux sessions ended because they held more than `max_buffered_bytes` unread.
    pub yamux_buffer_limit_exceeded: IntCounter,
    /// Bytes all sessions hold buffered and unread (yamux receive buffers, partial dRPC
    /// packets, messages not yet taken by their call).
    pub session_buffered_bytes: IntGauge,
    /// dRPC transports (yamux streams) closed because of malformed frames, oversized packets,
    /// id monotonicity violations or other protocol errors.
    pub drpc_protocol_errors: IntCounter,
    /// dRPC invokes of a method no handler knows (answered with code 12).
    pub drpc_unknown_methods: IntCounter,
    /// dRPC calls started.
    pub drpc_calls: IntCounter,
    /// WebSockets closed with 1001 because a ping was not answered.
    pub ws_liveness_failures: IntCounter,
    /// WebSockets closed with 1003 because the peer sent a text message.
    pub ws_text_messages: IntCounter,
    /// WebSockets ended because one message write was blocked past the write timeout.
    pub ws_write_timeouts: IntCounter,
}

fn counter(name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    IntCounter::with_opts(Opts::new(name, help))
}

fn gauge(name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    IntGauge::with_opts(Opts::new(name, help))
}

impl RpcMetrics {
    /// Fresh, unregistered metrics (see [`RpcMetrics::register`]).
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(RpcMetrics {
            yamux_protocol_errors: counter(
                "tailnetd_yamux_protocol_errors_total",
                "yamux sessions ended by a peer protocol error",
            )?,
            yamux_keepalive_timeouts: counter(
                "tailnetd_yamux_keepalive_timeouts_total",
                "yamux sessions ended because a keepalive ping was not answered in time",
            )?,
            yamux_write_timeouts: counter(
                "tailnetd_yamux_write_timeouts_total",
                "yamux sessions ended because a frame write blocked past the write timeout",
            )?,
            yamux_streams_rejected: counter(
                "tailnetd_yamux_streams_rejected_total",
                "inbound yamux streams refused with RST",
            )?,
            yamux_sessions: gauge("tailnetd_yamux_sessions", "live yamux sessions")?,
            yamux_streams: gauge("tailnetd_yamux_streams", "live yamux streams")?,
            yamux_buffer_limit_exceeded: counter(
                "tailnetd_yamux_buffer_limit_exceeded_total",
                "yamux sessions ended because they held more unread bytes than allowed",
            )?,
            session_buffered_bytes: gauge(
                "coordinator_session_buffered_bytes",
                "bytes held buffered and unread for v2 sessions (yamux buffers, partial dRPC packets, queued messages)",
            )?,
            drpc_protocol_errors: counter(
                "tailnetd_drpc_protocol_errors_total",
                "dRPC transports closed because of a protocol error",
            )?,
            drpc_unknown_methods: counter(
                "tailnetd_drpc_unknown_methods_total",
                "dRPC invokes of unknown methods",
            )?,
            drpc_calls: counter("tailnetd_drpc_calls_total", "dRPC calls started")?,
            ws_liveness_failures: counter(
                "tailnetd_ws_liveness_failures_total",
                "websockets closed because a ping was not answered",
            )?,
            ws_text_messages: counter(
                "tailnetd_ws_text_messages_total",
                "websockets closed because the peer sent a text message",
            )?,
            ws_write_timeouts: counter(
                "tailnetd_ws_write_timeouts_total",
                "websockets ended because a message write timed out",
            )?,
        })
    }

    /// Registers every metric with `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        let counters = [
            &self.yamux_protocol_errors,
            &self.yamux_keepalive_timeouts,
            &self.yamux_write_timeouts,
            &self.yamux_streams_rejected,
            &self.yamux_buffer_limit_exceeded,
            &self.drpc_protocol_errors,
            &self.drpc_unknown_methods,
            &self.drpc_calls,
            &self.ws_liveness_failures,
            &self.ws_text_messages,
            &self.ws_write_timeouts,
        ];
        for c in counters {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(self.yamux_sessions.clone()))?;
        registry.register(Box::new(self.yamux_streams.clone()))?;
        registry.register(Box::new(self.session_buffered_bytes.clone()))?;
        Ok(())
    }
}

/// Optional metrics sink carried by the configs: `None` counts nothing (tests, tools).
pub type MetricsRef = Option<Arc<RpcMetrics>>;

/// Increments `pick(metrics)` when metrics are configured.
pub(crate) fn count(metrics: &MetricsRef, pick: impl FnOnce(&RpcMetrics) -> &IntCounter) {
    if let Some(m) = metrics {
        pick(m).inc();
    }
}

/// Adds `delta` to the gauge `pick(metrics)` when metrics are configured.
pub(crate) fn gauge_add(
    metrics: &MetricsRef,
    pick: impl FnOnce(&RpcMetrics) -> &IntGauge,
    delta: i64,
) {
    if let Some(m) = metrics {
        pick(m).add(delta);
    }
}
