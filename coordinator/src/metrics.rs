//! Prometheus metrics of the coordinator's API face (sessions, auth failures, protocol errors,
//! telemetry, DERP map updates). The peer graph registers its own metrics.
//!
//! Why: every rejected or broken connection must be visible as a number, not only as a log line.
//! This module must never register a metric twice on the same registry (each `Coordinator`
//! registers one [`Metrics`]).

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Metrics owned by the API face.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `coordinator_sessions{role,protocol}`: open coordination sessions (agent/client × v1/v2).
    pub sessions: IntGaugeVec,
    /// `coordinator_auth_failures_total{reason}`.
    pub auth_failures: IntCounterVec,
    /// `coordinator_protocol_errors_total{kind}`: bad input that ended a session or stream.
    pub protocol_errors: IntCounterVec,
    /// `coordinator_telemetry_events_total`: events received through `PostTelemetry`.
    pub telemetry_events: IntCounter,
    /// `coordinator_derp_map_updates_total`: DERP map changes published to subscribers.
    pub derp_map_updates: IntCounter,
    /// `coordinator_dropped_messages_total{kind}`: messages dropped on a full bounded queue.
    pub dropped: IntCounterVec,
}

impl Metrics {
    /// Create and register on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let sessions = IntGaugeVec::new(
            Opts::new("coordinator_sessions", "Open coordination sessions."),
            &["role", "protocol"],
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "coordinator_auth_failures_total",
                "Rejected coordination requests by reason.",
            ),
            &["reason"],
        )?;
        let protocol_errors = IntCounterVec::new(
            Opts::new(
                "coordinator_protocol_errors_total",
                "Malformed input that ended a session or stream, by kind.",
            ),
            &["kind"],
        )?;
        let telemetry_events = IntCounter::new(
            "coordinator_telemetry_events_total",
            "Telemetry events received from clients.",
        )?;
        let derp_map_updates = IntCounter::new(
            "coordinator_derp_map_updates_total",
            "DERP map changes published to subscribers.",
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "coordinator_dropped_messages_total",
                "Messages dropped because a bounded queue was full, by kind.",
            ),
            &["kind"],
        )?;
        for role in [Role::Agent, Role::Client] {
            for protocol in [Protocol::V1, Protocol::V2] {
                sessions
                    .with_label_values(&[role.as_str(), protocol.as_str()])
                    .set(0);
            }
        }
        // Present at zero from the start, so that dashboards and alerts see the series.
        dropped.with_label_values(&["v1_unconvertible_node"]);
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(protocol_errors.clone()))?;
        registry.register(Box::new(telemetry_events.clone()))?;
        registry.register(Box::new(derp_map_updates.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        Ok(Self {
            sessions,
            auth_failures,
            protocol_errors,
            telemetry_events,
            derp_map_updates,
            dropped,
        })
    }

    /// Count one bad input of `kind`.
    pub fn protocol_error(&self, kind: &str) {
        self.protocol_errors.with_label_values(&[kind]).inc();
    }

    /// Count one auth failure of `reason`.
    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    /// Track an open session; the gauge goes down when the guard drops.
    pub fn session(&self, role: Role, protocol: Protocol) -> SessionGuard {
        let g = self
            .sessions
            .with_label_values(&[role.as_str(), protocol.as_str()]);
        g.inc();
        SessionGuard(g)
    }
}

/// Which side of a tunnel a session serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A workspace agent.
    Agent,
    /// A client (CLI, IDE, Desktop).
    Client,
}

impl Role {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Client => "client",
        }
    }
}

/// Coordination protocol generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// JSON over WebSocket.
    V1,
    /// dRPC over yamux over WebSocket.
    V2,
}

impl Protocol {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::V1 => "v1",
            Protocol::V2 => "v2",
        }
    }
}

/// Decrements `coordinator_sessions` on drop.
#[derive(Debug)]
pub struct SessionGuard(prometheus::IntGauge);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
