//! The STUN server next to the relay: tells Tailscale clients their public UDP address.
//!
//! Why it lives here: every DERP node is also the STUN server its region advertises (UDP 3478);
//! netcheck sends a Binding Request every 20-26 s per region and decides NAT type and the
//! preferred region from the answers. We answer exactly what derper answers: only Tailscale's own
//! requests (SOFTWARE `tailnode` and a valid trailing FINGERPRINT, parsed by
//! [`proto::stun::parse_binding_request`]), with one XOR-MAPPED-ADDRESS (family 1 for IPv4,
//! including v4-mapped sources on a dual-stack socket). Anything else gets no answer.
//!
//! Rules: one task, one reused 64 KiB buffer, nothing queued: a reply that cannot be sent right
//! now (socket buffer full) is dropped and counted as `write_error`, so a flood can never grow
//! memory or stall the loop. Never rate-limit (clients retransmit after 100-200 ms and would
//! misjudge the network).

use std::net::IpAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// How long the loop pauses after a socket read error (derper sleeps 1 s; we are gentler).
const READ_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// STUN counters, named after derper's `stun` expvars.
#[derive(Clone, Debug)]
pub struct StunMetrics {
    read_error: prometheus::IntCounter,
    not_stun: prometheus::IntCounter,
    write_error: prometheus::IntCounter,
    success: prometheus::IntCounter,
    ipv4: prometheus::IntCounter,
    ipv6: prometheus::IntCounter,
}

impl StunMetrics {
    /// Registers `derp_stun_requests_total{disposition}` and `derp_stun_addrfamily_total{family}`.
    pub fn new(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let requests = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "derp_stun_requests_total",
                "STUN packets received, by disposition (read_error, not_stun, write_error, success).",
            ),
            &["disposition"],
        )?;
        let family = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "derp_stun_addrfamily_total",
                "Valid STUN binding requests by source address family.",
            ),
            &["family"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(family.clone()))?;
        Ok(StunMetrics {
            read_error: requests.with_label_values(&["read_error"]),
            not_stun: requests.with_label_values(&["not_stun"]),
            write_error: requests.with_label_values(&["write_error"]),
            success: requests.with_label_values(&["success"]),
            ipv4: family.with_label_values(&["ipv4"]),
            ipv6: family.with_label_values(&["ipv6"]),
        })
    }

    /// Successful answers so far.
    pub fn success(&self) -> u64 {
        self.success.get()
    }

    /// Packets ignored because they were not Tailscale binding requests.
    pub fn not_stun(&self) -> u64 {
        self.not_stun.get()
    }
}

fn is_ipv4(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    }
}

/// Answers STUN binding requests on `socket` until `cancel` fires.
pub async fn serve(socket: UdpSocket, metrics: StunMetrics, cancel: CancellationToken) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (n, src) = match received {
            Ok(x) => x,
            Err(e) => {
                metrics.read_error.inc();
                tracing::debug!(error = %e, "STUN read error");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(READ_ERROR_PAUSE) => continue,
                }
            }
        };
        let Some(packet) = buf.get(..n) else {
            continue;
        };
        let txid = match proto::stun::parse_binding_request(packet) {
            Ok(txid) => txid,
            Err(_) => {
                metrics.not_stun.inc();
                continue;
            }
        };
        if is_ipv4(src.ip()) {
            metrics.ipv4.inc();
        } else {
            metrics.ipv6.inc();
        }
        let reply = proto::stun::build_binding_response(txid, src);
        match socket.try_send_to(&reply, src) {
            Ok(_) => metrics.success.inc(),
            Err(e) => {
                metrics.write_error.inc();
                tracing::debug!(error = %e, %src, "STUN write error");
            }
        }
    }
}
