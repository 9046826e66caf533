//! The coordinator's region health probes relays with the relay crate's client: this is where
//! the two meet (the crates never depend on each other; the binary composes them).
//!
//! Why the node's URL is built here: a DERP map node says where to dial in Tailscale's terms
//! (`HostName`, `IPv4`, `DERPPort`, `ForceHTTP`, `InsecureForTests`), which the Go client turns
//! into a dial address and a TLS server name; this does the same.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use coordinator::relay_health::{ProbeOutcome, RelayProber};
use derp::client::dial::DialTls;
use derp::client::probe::{probe_node, NodeHealth};
use proto::derpmap::DerpNode;
use proto::key::NodePrivate;

/// Probes relays with one key for the life of the process.
pub struct DerpProber {
    key: NodePrivate,
    timeout: Duration,
}

impl DerpProber {
    /// A prober with a fresh key; each probe bounded by `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            key: NodePrivate::generate(&mut rand::rngs::OsRng),
            timeout,
        }
    }
}

/// `(url, tls)` to reach `node` as Tailscale's client would: plain HTTP only with `ForceHTTP`,
/// a literal `IPv4` dialled directly with `HostName` as the TLS server name.
pub fn node_target(node: &DerpNode) -> (String, DialTls) {
    let https = !node.force_http;
    let port = match node.derp_port {
        p if p > 0 => p,
        _ if https => 443,
        _ => 80,
    };
    let literal = node
        .ipv4
        .parse::<std::net::Ipv4Addr>()
        .ok()
        .map(|ip| ip.to_string());
    let host = literal.unwrap_or_else(|| node.host_name.clone());
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let scheme = if https { "https" } else { "http" };
    let tls = DialTls {
        // A `sha256-raw:` CertName pins a self-signed leaf, which the web PKI cannot verify;
        // health only asks whether the relay answers, so such nodes (and test nodes) are probed
        // without verification.
        insecure_skip_verify: node.insecure_for_tests || node.cert_name.starts_with("sha256-raw:"),
        server_name: Some(node.host_name.clone()),
        ..DialTls::default()
    };
    (format!("{scheme}://{host}:{port}/derp"), tls)
}

impl RelayProber for DerpProber {
    fn probe(&self, node: &DerpNode) -> Pin<Box<dyn Future<Output = ProbeOutcome> + Send>> {
        let (url, tls) = node_target(node);
        let key = self.key.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match probe_node(&url, &key, &tls, timeout).await {
                NodeHealth::Up => ProbeOutcome::Up,
                NodeHealth::Draining => ProbeOutcome::Draining,
                NodeHealth::Down(why) => ProbeOutcome::Down(format!("{url}: {why}")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_urls_follow_the_go_client() {
        let n = DerpNode {
            host_name: "derp.example.com".into(),
            ..Default::default()
        };
        assert_eq!(node_target(&n).0, "https://derp.example.com:443/derp");
        let n = DerpNode {
            host_name: "127.0.0.1".into(),
            derp_port: 3340,
            force_http: true,
            ..Default::default()
        };
        assert_eq!(node_target(&n).0, "http://127.0.0.1:3340/derp");
        let n = DerpNode {
            host_name: "derp.example.com".into(),
            ipv4: "192.0.2.7".into(),
            derp_port: 8443,
            ..Default::default()
        };
        let (url, tls) = node_target(&n);
        assert_eq!(url, "https://192.0.2.7:8443/derp");
        assert_eq!(tls.server_name.as_deref(), Some("derp.example.com"));
        assert!(!tls.insecure_skip_verify);
    }
}
