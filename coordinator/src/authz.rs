//! Who may do what on a coordination stream (Coder's `CoordinateeAuth`, tailnet/tunnel.go).
//!
//! Why: the HTTP layer decides *who* a peer is (agent token, user session, in-process server
//! tailnet); this module decides what that identity may put in a `CoordinateRequest`. The whole
//! request is authorized before any part of it is applied, so a rejected request never changes the
//! graph. Detail strings follow Coder's wording so operators can grep the same messages.
//!
//! This module must never do I/O or wait: the upstream "may this user reach that agent?" check for
//! [`CoordinateeAuth::ClientUser`] is done by the session beforehand, which records the answer in
//! an [`AllowedAgents`] set (or any [`TunnelPermissions`]) that is read here synchronously.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, RwLock};

use proto::tailnet::v2::CoordinateRequest;
use uuid::Uuid;

/// First six bytes of Tailscale's service prefix `fd7a:115c:a1e0::/48`.
pub const TAILSCALE_SERVICE_PREFIX: [u8; 6] = [0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0];
/// First six bytes of Coder's service prefix `fd60:627a:a42b::/48`.
pub const CODER_SERVICE_PREFIX: [u8; 6] = [0xfd, 0x60, 0x62, 0x7a, 0xa4, 0x2b];
/// The single address every workspace agent used before per-agent addresses existed.
pub const LEGACY_AGENT_IP: Ipv6Addr = Ipv6Addr::new(
    0xfd7a, 0x115c, 0xa1e0, 0x49d6, 0xb259, 0xb7ac, 0xb1b2, 0x48f4,
);

/// Coder's `AddrFromUUID`: the UUID's 16 bytes with the first six replaced by `prefix`.
pub fn addr_from_uuid(prefix: [u8; 6], id: Uuid) -> Ipv6Addr {
    let mut b = *id.as_bytes();
    b[..6].copy_from_slice(&prefix);
    Ipv6Addr::from(b)
}

/// Answers "may this client open a tunnel to that agent?" without waiting. Sessions fill the
/// answer in before handing requests to the graph (the upstream permission check is async).
pub trait TunnelPermissions: Send + Sync + fmt::Debug {
    /// Whether a tunnel to `agent` is allowed.
    fn may_tunnel_to(&self, agent: Uuid) -> bool;
}

/// A set of agents a `ClientUser` session has already been authorized to reach.
#[derive(Debug, Default)]
pub struct AllowedAgents {
    agents: RwLock<HashSet<Uuid>>,
}

impl AllowedAgents {
    /// An empty set (nothing allowed yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows tunnels to `agent`.
    pub fn allow(&self, agent: Uuid) {
        match self.agents.write() {
            Ok(mut g) => {
                g.insert(agent);
            }
            Err(poisoned) => {
                poisoned.into_inner().insert(agent);
            }
        }
    }

    /// Withdraws permission for `agent` (existing tunnels are not touched).
    pub fn revoke(&self, agent: Uuid) {
        match self.agents.write() {
            Ok(mut g) => {
                g.remove(&agent);
            }
            Err(poisoned) => {
                poisoned.into_inner().remove(&agent);
            }
        }
    }
}

impl TunnelPermissions for AllowedAgents {
    fn may_tunnel_to(&self, agent: Uuid) -> bool {
        match self.agents.read() {
            Ok(g) => g.contains(&agent),
            Err(poisoned) => poisoned.into_inner().contains(&agent),
        }
    }
}

/// The identity a coordination stream was opened with, and therefore what it may request.
#[derive(Clone, Debug)]
pub enum CoordinateeAuth {
    /// A workspace agent (`/me/rpc`): may not open tunnels; may only announce its own addresses.
    Agent {
        /// The agent's UUID (also its peer id).
        id: Uuid,
    },
    /// A client of one agent (`/workspaceagents/{id}/coordinate`).
    Client {
        /// The only agent this client may tunnel to.
        agent_id: Uuid,
    },
    /// A user-scoped client (`/api/v2/tailnet`, Coder Desktop): tunnels to pre-authorized agents.
    ClientUser {
        /// Agents this session may reach, filled in by the session before requests arrive.
        permissions: Arc<dyn TunnelPermissions>,
    },
    /// coderd's own server tailnet, workspace proxies, tests: anything goes.
    SingleTailnet,
}

/// Why a whole request was refused. `Display` is the detail after `"authorization: "`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    /// An agent sent `add_tunnel`.
    #[error("agents cannot open tunnels")]
    AgentCannotOpenTunnels,
    /// A client sent `ready_for_handshake`.
    #[error("clients may not send ready_for_handshake")]
    ClientReadyForHandshake,
    /// `add_tunnel.id` was not 16 bytes.
    #[error("parse add tunnel id: invalid UUID (got {0} bytes)")]
    ParseTunnelId(usize),
    /// A `Client` tried to tunnel somewhere other than its agent.
    #[error("invalid agent id, expected {expected}, got {got}")]
    WrongAgent {
        /// The agent the stream was opened for.
        expected: Uuid,
        /// The requested destination.
        got: Uuid,
    },
    /// A `ClientUser` asked for an agent it has no permission for.
    #[error("workspace agent not found or you do not have permission")]
    NoPermission,
    /// An address was not a valid prefix.
    #[error("parse node address: {0:?}")]
    ParseAddress(String),
    /// An address prefix was not a /128.
    #[error("invalid address bits, expected 128, got {0}")]
    AddressBits(u8),
    /// An agent announced an address that is not its own.
    #[error("invalid node address, got {0}")]
    NodeAddress(String),
    /// An agent's address check failed in the named node field (`Addresses` or `AllowedIps`);
    /// Coder words it `"<field>: <reason>"`, and its conformance tests compare the text.
    #[error("{field}: {source}")]
    AgentField {
        /// The node field, spelled as Coder's Go struct field.
        field: &'static str,
        /// What was wrong in it.
        source: Box<AuthzError>,
    },
}

/// Parses netip-style prefix text (`addr/bits`), returning the address and bit count.
fn parse_prefix(s: &str) -> Result<(IpAddr, u8), AuthzError> {
    let bad = || AuthzError::ParseAddress(s.to_owned());
    let (addr, bits) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    // netip rejects signs and leading zeros ("/0128"); so do we.
    if bits.is_empty()
        || !bits.bytes().all(|b| b.is_ascii_digit())
        || (bits.len() > 1 && bits.starts_with('0'))
    {
        return Err(bad());
    }
    let bits: u8 = bits.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if bits > max {
        return Err(bad());
    }
    Ok((addr, bits))
}

fn check_client_addresses(addrs: &[String]) -> Result<(), AuthzError> {
    for a in addrs {
        let (_, bits) = parse_prefix(a)?;
        if bits != 128 {
            return Err(AuthzError::AddressBits(bits));
        }
    }
    Ok(())
}

fn check_agent_addresses(id: Uuid, addrs: &[String]) -> Result<(), AuthzError> {
    let ts = IpAddr::V6(addr_from_uuid(TAILSCALE_SERVICE_PREFIX, id));
    let coder = IpAddr::V6(addr_from_uuid(CODER_SERVICE_PREFIX, id));
    let legacy = IpAddr::V6(LEGACY_AGENT_IP);
    for a in addrs {
        let (addr, bits) = parse_prefix(a)?;
        if bits != 128 {
            return Err(AuthzError::AddressBits(bits));
        }
        if addr != ts && addr != coder && addr != legacy {
            return Err(AuthzError::NodeAddress(addr.to_string()));
        }
    }
    Ok(())
}

fn tunnel_uuid(id: &[u8]) -> Result<Uuid, AuthzError> {
    Uuid::from_slice(id).map_err(|_| AuthzError::ParseTunnelId(id.len()))
}

impl CoordinateeAuth {
    /// Short role label for metrics and logs: `agent`, `client` or `other`.
    pub fn role(&self) -> &'static str {
        match self {
            CoordinateeAuth::Agent { .. } => "agent",
            CoordinateeAuth::Client { .. } | CoordinateeAuth::ClientUser { .. } => "client",
            CoordinateeAuth::SingleTailnet => "other",
        }
    }

    /// Authorizes a whole request before any part of it is applied. A request whose
    /// `update_self` has no node passes here; the graph rejects it separately.
    pub fn authorize(&self, req: &CoordinateRequest) -> Result<(), AuthzError> {
        let node = req.update_self.as_ref().and_then(|u| u.node.as_ref());
        match self {
            CoordinateeAuth::SingleTailnet => Ok(()),
            CoordinateeAuth::Agent { id } => {
                if req.add_tunnel.is_some() {
                    return Err(AuthzError::AgentCannotOpenTunnels);
                }
                if let Some(node) = node {
                    check_agent_addresses(*id, &node.addresses).map_err(|e| {
                        AuthzError::AgentField {
                            field: "Addresses",
                            source: Box::new(e),
                        }
                    })?;
                    check_agent_addresses(*id, &node.allowed_ips).map_err(|e| {
                        AuthzError::AgentField {
                            field: "AllowedIps",
                            source: Box::new(e),
                        }
                    })?;
                }
                Ok(())
            }
            CoordinateeAuth::Client { agent_id } => {
                if let Some(t) = &req.add_tunnel {
                    let got = tunnel_uuid(&t.id)?;
                    if got != *agent_id {
                        return Err(AuthzError::WrongAgent {
                            expected: *agent_id,
                            got,
                        });
                    }
                }
                client_node_rules(node, req)
            }
            CoordinateeAuth::ClientUser { permissions } => {
                if let Some(t) = &req.add_tunnel {
                    let got = tunnel_uuid(&t.id)?;
                    if !permissions.may_tunnel_to(got) {
                        return Err(AuthzError::NoPermission);
                    }
                }
                client_node_rules(node, req)
            }
        }
    }
}

fn client_node_rules(
    node: Option<&proto::tailnet::v2::Node>,
    req: &CoordinateRequest,
) -> Result<(), AuthzError> {
    if let Some(node) = node {
        check_client_addresses(&node.addresses)?;
    }
    if !req.ready_for_handshake.is_empty() {
        return Err(AuthzError::ClientReadyForHandshake);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::tailnet::v2::coordinate_request::{ReadyForHandshake, Tunnel, UpdateSelf};
    use proto::tailnet::v2::Node;

    fn update(addresses: &[&str], allowed: &[&str]) -> CoordinateRequest {
        CoordinateRequest {
            update_self: Some(UpdateSelf {
                node: Some(Node {
                    addresses: addresses.iter().map(|s| s.to_string()).collect(),
                    allowed_ips: allowed.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    fn add(id: &[u8]) -> CoordinateRequest {
        CoordinateRequest {
            add_tunnel: Some(Tunnel {
                id: bytes::Bytes::copy_from_slice(id),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn addr_from_uuid_matches_coder() {
        let id = Uuid::parse_str("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        assert_eq!(
            addr_from_uuid(TAILSCALE_SERVICE_PREFIX, id).to_string(),
            "fd7a:115c:a1e0:6677:8899:aabb:ccdd:eeff"
        );
        assert_eq!(
            addr_from_uuid(CODER_SERVICE_PREFIX, id).to_string(),
            "fd60:627a:a42b:6677:8899:aabb:ccdd:eeff"
        );
    }

    #[test]
    fn agent_rules() {
        let id = Uuid::new_v4();
        let a = CoordinateeAuth::Agent { id };
        let ts = format!("{}/128", addr_from_uuid(TAILSCALE_SERVICE_PREFIX, id));
        let cd = format!("{}/128", addr_from_uuid(CODER_SERVICE_PREFIX, id));
        let legacy = format!("{LEGACY_AGENT_IP}/128");
        assert_eq!(
            a.authorize(&update(&[&ts, &cd, &legacy], &[&ts, &cd])),
            Ok(())
        );
        assert_eq!(
            a.authorize(&add(Uuid::new_v4().as_bytes())),
            Err(AuthzError::AgentCannotOpenTunnels)
        );
        let in_field = |field: &'static str, e: AuthzError| {
            Err(AuthzError::AgentField {
                field,
                source: Box::new(e),
            })
        };
        let foreign = || AuthzError::NodeAddress("fd7a:115c:a1e0::1".into());
        assert_eq!(
            a.authorize(&update(&["fd7a:115c:a1e0::1/128"], &[])),
            in_field("Addresses", foreign())
        );
        assert_eq!(
            a.authorize(&update(&[&ts], &["fd7a:115c:a1e0::1/128"])),
            in_field("AllowedIps", foreign())
        );
        let ts64 = format!("{}/64", addr_from_uuid(TAILSCALE_SERVICE_PREFIX, id));
        assert_eq!(
            a.authorize(&update(&[&ts64], &[])),
            in_field("Addresses", AuthzError::AddressBits(64))
        );
        assert_eq!(
            a.authorize(&update(&[], &[&ts64])),
            in_field("AllowedIps", AuthzError::AddressBits(64))
        );
        // Coder's exact wording, which its conformance tests compare.
        assert_eq!(
            a.authorize(&update(&[&ts64], &[]))
                .map_err(|e| format!("authorization: {e}")),
            Err("authorization: Addresses: invalid address bits, expected 128, got 64".into())
        );
        assert!(matches!(
            a.authorize(&update(&["garbage"], &[])),
            Err(AuthzError::AgentField { source, .. }) if matches!(*source, AuthzError::ParseAddress(_))
        ));
        // Agents may send ready_for_handshake.
        let rfh = CoordinateRequest {
            ready_for_handshake: vec![ReadyForHandshake {
                id: bytes::Bytes::copy_from_slice(Uuid::new_v4().as_bytes()),
            }],
            ..Default::default()
        };
        assert_eq!(a.authorize(&rfh), Ok(()));
    }

    #[test]
    fn client_rules() {
        let agent = Uuid::new_v4();
        let c = CoordinateeAuth::Client { agent_id: agent };
        assert_eq!(c.authorize(&add(agent.as_bytes())), Ok(()));
        let other = Uuid::new_v4();
        assert_eq!(
            c.authorize(&add(other.as_bytes())),
            Err(AuthzError::WrongAgent {
                expected: agent,
                got: other
            })
        );
        assert_eq!(
            c.authorize(&add(&[1, 2, 3])),
            Err(AuthzError::ParseTunnelId(3))
        );
        assert_eq!(
            c.authorize(&update(&["fd00::1/128"], &["10.0.0.0/8"])),
            Ok(())
        );
        assert_eq!(
            c.authorize(&update(&["fd00::1/64"], &[])),
            Err(AuthzError::AddressBits(64))
        );
        assert_eq!(
            c.authorize(&update(&["10.0.0.1/32"], &[])),
            Err(AuthzError::AddressBits(32))
        );
        let rfh = CoordinateRequest {
            ready_for_handshake: vec![ReadyForHandshake::default()],
            ..Default::default()
        };
        assert_eq!(c.authorize(&rfh), Err(AuthzError::ClientReadyForHandshake));
    }

    #[test]
    fn client_user_rules() {
        let perms = Arc::new(AllowedAgents::new());
        let c = CoordinateeAuth::ClientUser {
            permissions: perms.clone(),
        };
        let agent = Uuid::new_v4();
        assert_eq!(
            c.authorize(&add(agent.as_bytes())),
            Err(AuthzError::NoPermission)
        );
        perms.allow(agent);
        assert_eq!(c.authorize(&add(agent.as_bytes())), Ok(()));
        perms.revoke(agent);
        assert_eq!(
            c.authorize(&add(agent.as_bytes())),
            Err(AuthzError::NoPermission)
        );
        assert_eq!(c.role(), "client");
    }

    #[test]
    fn single_tailnet_allows_anything() {
        let s = CoordinateeAuth::SingleTailnet;
        assert_eq!(s.authorize(&update(&["garbage"], &["x"])), Ok(()));
        assert_eq!(s.authorize(&add(&[1])), Ok(()));
    }

    #[test]
    fn prefix_parsing() {
        assert!(parse_prefix("fd00::1/128").is_ok());
        assert!(parse_prefix("fd00::1").is_err());
        assert!(parse_prefix("fd00::1/129").is_err());
        assert!(parse_prefix("fd00::1/0128").is_err());
        assert!(parse_prefix("fd00::1/+12").is_err());
        assert!(parse_prefix("1.2.3.4/33").is_err());
        assert_eq!(parse_prefix("1.2.3.4/0").map(|p| p.1), Ok(0));
    }
}
