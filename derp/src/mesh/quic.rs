//! Mesh over QUIC between tailnetd relays.
//!
//! Why it exists: the DERP mesh ([`super`]) carries every forwarded packet of a relay pair on one
//! TCP connection, so one lost segment stalls all clients behind it (head-of-line blocking), and
//! each packet is framed twice (ForwardPacket, then TLS records). Between two tailnetd relays we
//! control both ends, so packets travel as QUIC datagrams instead: unordered, unreliable like the
//! WireGuard packets inside them, congestion-controlled, one loss delays nobody else. derper
//! peers keep the DERP mesh: which peers speak QUIC is configuration (`--mesh-quic-with`), never
//! guessed.
//!
//! Shape (the wire format is `proto::derp::quicmesh`):
//! - Each relay listens on one UDP address (`--mesh-quic-addr`) and dials every peer it lists,
//!   one QUIC connection per listed peer, like derper's mesh: on the connection it dials, a relay
//!   learns the peer's clients and sends it packets; on connections it accepts, it announces its
//!   own clients and receives packets. A relay that lists itself sees its own key in the Hello
//!   and stops that link for good.
//! - Packets: `seq | dst | RecvPacket frame` as a datagram; when that is larger than
//!   `Connection::max_datagram_size()` (before path MTU discovery, or packets near 64 KiB) it
//!   goes (without `seq`) on a unidirectional stream of its own, so nothing is cut or dropped
//!   for size.
//! - Presence: one bidirectional stream, opened by the dialer. Both send Hello first; then the
//!   acceptor sends its complete client list (SyncStart … SyncEnd) and every change. Its queue
//!   of changes is bounded ([`crate::core::mesh::PresenceFeed`]): on overflow the complete list
//!   is sent again and the dialer replaces its set, so nothing is lost.
//!
//! Authentication: the mesh key, not certificates. The relays' DERP keys are Curve25519
//! (key agreement, not signatures) so they cannot sign a TLS handshake, and rustls has no
//! external-PSK TLS 1.3. So each relay presents a throw-away self-signed certificate (accepted
//! by the other side; the handshake signature is still verified) and then both prove they hold
//! the mesh key: Hello carries HMAC-SHA256(mesh key, label | role | sender's DERP key | 32 bytes
//! exported from this TLS session's secrets, RFC 5705). The exporter binds the proof to this
//! connection: a relay without the key cannot compute it, a man in the middle has two different
//! sessions and cannot relay it, and the role byte stops reflecting the dialer's tag back. No
//! datagram, stream or presence message is accepted before the peer's Hello verified; a wrong
//! tag closes the connection (`derp_mesh_quic_rejected{reason="auth"}`, and a log line).
//!
//! Bounded: the forward queue per peer (core, drops in `derp_mesh_forward_dropped{peer}`); a
//! full datagram send buffer makes the link wait (backpressure into that queue); datagrams
//! still in QUIC's send buffer when a link ends count in `derp_mesh_forward_dropped{peer}` too
//! (numbered minus sent, from QUIC's statistics). Datagrams are unreliable: those lost on the
//! path, or dropped by the receiver's QUIC stack when its datagram buffer is full (it drops
//! the oldest), are counted by the receiver from the gaps in their sequence numbers
//! (`derp_mesh_quic_datagrams_lost`, [`DatagramLoss`]; one dropped by the sender's QUIC
//! stack after a path MTU reduction may be counted on both sides); remotely opened streams are capped by QUIC flow control ([`MAX_UNI_STREAMS`]);
//! presence as above. A malformed unit or message closes the connection with a log line and a
//! count in `derp_mesh_quic_rejected{reason}`. A packet received from the mesh is delivered
//! locally only ([`Server::deliver_forwarded`]), never forwarded again.
//!
//! Must never: accept input from a peer before its Hello verified, keep routes of a link that
//! is down, hold a lock across `.await`, or outlive [`QuicMeshHandle::shutdown`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use proto::derp::quicmesh::{decode_datagram, decode_packet, encode_datagram, encode_packet};
use proto::derp::quicmesh::{DatagramLoss, MeshMsg, ALPN, PACKET_UNIT_MAX, SEQ_LEN};
use proto::derp::quicmesh::{QuicMeshError as WireError, TAG_LEN};
use proto::derp::KEY_LEN;
use proto::key::{MeshKey, NodePublic};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sha2::Sha256;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::core::mesh::{PresenceEvent, PresenceFeed};
use crate::core::server::Server;
use crate::mesh::{run_link, Dialed, LinkState, LinkTransport};

/// Deadline for the QUIC handshake plus the Hello exchange.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default QUIC keep-alive interval (`--mesh-quic-keepalive`): an idle link sends a PING this
/// often, so the peer's idle timer is fed and a dead peer is noticed within the idle timeout.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(1);
/// Default idle timeout (`--mesh-quic-idle-timeout`): no packet from the peer (keep-alives
/// included) for this long ends the connection. Six keep-alives may be lost in a row first.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(6);
/// Streams (one per oversized packet) a peer may have open at once towards us.
pub const MAX_UNI_STREAMS: u32 = 256;
/// Deadline for reading one oversized packet's stream.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Presence changes queued for one accepted connection before a full resync.
const FEED_CAP: usize = 65_536;
/// Received datagrams quinn buffers until the link reads them.
const DATAGRAM_RECV_BUFFER: usize = 8 << 20;
/// Datagrams quinn buffers for sending before `send_datagram_wait` waits.
const DATAGRAM_SEND_BUFFER: usize = 2 << 20;
/// Label of the TLS exporter (RFC 5705) the authentication tags are bound to.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-tailnetd-mesh-quic";
/// Domain separation of the authentication tags.
const TAG_LABEL: &[u8] = b"tailnetd-mesh/1 hello";
/// Name the dialer asks for (certificates are not checked against names, see the module doc).
const SERVER_NAME: &str = "tailnetd-mesh";

/// QUIC application error codes on CONNECTION_CLOSE.
mod code {
    pub const SHUTDOWN: u32 = 0;
    pub const AUTH: u32 = 1;
    pub const PROTOCOL: u32 = 2;
    pub const SELF: u32 = 3;
}

/// Errors in the QUIC mesh configuration or start.
#[derive(Debug, thiserror::Error)]
pub enum QuicConfigError {
    /// An entry of `--mesh-quic-with` is not `host:port`.
    #[error("QUIC mesh peer {entry:?}: {reason}")]
    BadPeer {
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The listen address does not parse.
    #[error("QUIC mesh listen address {0:?} is not ip:port")]
    BadListen(String),
    /// QUIC mesh without a mesh key.
    #[error("the QUIC mesh requires a mesh key (--mesh-psk-file)")]
    NoMeshKey,
    /// The UDP socket could not be bound.
    #[error("QUIC mesh UDP socket {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Building the TLS configuration failed.
    #[error("QUIC mesh TLS: {0}")]
    Tls(String),
    /// Keep-alive and idle timeout do not fit together.
    #[error("QUIC mesh timers: {0}")]
    Timers(&'static str),
}

/// The QUIC mesh's liveness timers, checked: a keep-alive of at least 100 ms and at most half
/// the idle timeout (so one lost keep-alive does not end a healthy link), an idle timeout of
/// at most 10 minutes (QUIC encodes it in milliseconds; a longer one hides dead peers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicTimers {
    keepalive: Duration,
    idle_timeout: Duration,
}

impl Default for QuicTimers {
    fn default() -> Self {
        QuicTimers {
            keepalive: DEFAULT_KEEPALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl QuicTimers {
    /// Checks the pair (see the type's doc).
    pub fn new(keepalive: Duration, idle_timeout: Duration) -> Result<Self, QuicConfigError> {
        if keepalive < Duration::from_millis(100) {
            return Err(QuicConfigError::Timers("keep-alive must be at least 100ms"));
        }
        if idle_timeout > Duration::from_secs(600) {
            return Err(QuicConfigError::Timers("idle timeout must be at most 10m"));
        }
        if keepalive * 2 > idle_timeout {
            return Err(QuicConfigError::Timers(
                "keep-alive must be at most half the idle timeout",
            ));
        }
        Ok(QuicTimers {
            keepalive,
            idle_timeout,
        })
    }
}

/// One QUIC mesh peer as configured: `host:port` of its UDP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicPeer {
    /// The entry as written (log prefix and the `peer` metric label, prefixed `quic:`).
    pub name: String,
}

/// Parses `--mesh-quic-with`: comma-separated `host:port` (IPv6 as `[addr]:port`). Blanks around
/// entries are ignored; duplicates are dropped; an empty list is none.
pub fn parse_mesh_quic_with(list: &str) -> Result<Vec<QuicPeer>, QuicConfigError> {
    let mut peers: Vec<QuicPeer> = Vec::new();
    if list.trim().is_empty() {
        return Ok(peers);
    }
    for raw in list.split(',') {
        let entry = raw.trim();
        let bad = |reason| QuicConfigError::BadPeer {
            entry: entry.to_string(),
            reason,
        };
        if entry.is_empty() {
            return Err(bad("empty entry"));
        }
        let (host, port) = entry.rsplit_once(':').ok_or_else(|| bad("no :port"))?;
        if host.is_empty() || host == "[]" {
            return Err(bad("empty host"));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(bad("IPv6 addresses are written [addr]:port"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(bad("port is not 1..=65535")),
        }
        if !peers.iter().any(|p| p.name == entry) {
            peers.push(QuicPeer {
                name: entry.to_string(),
            });
        }
    }
    Ok(peers)
}

/// Parses `--mesh-quic-addr`: empty is off.
pub fn parse_mesh_quic_addr(s: &str) -> Result<Option<SocketAddr>, QuicConfigError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| QuicConfigError::BadListen(s.to_string()))
}

/// Which side of a connection a tag is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The relay that dialed.
    Dialer,
    /// The relay that accepted.
    Acceptor,
}

/// The Hello tag: HMAC-SHA256(mesh key, label | role | sender's DERP key | exporter bytes).
pub fn auth_tag(
    mesh_key: &MeshKey,
    role: Role,
    sender: &NodePublic,
    exported: &[u8; 32],
) -> [u8; TAG_LEN] {
    tag_mac(mesh_key, role, sender, exported)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `tag` is the Hello tag of `sender` in `role` (constant-time comparison).
pub fn verify_tag(
    mesh_key: &MeshKey,
    role: Role,
    sender: &NodePublic,
    exported: &[u8; 32],
    tag: &[u8; TAG_LEN],
) -> bool {
    tag_mac(mesh_key, role, sender, exported)
        .verify_slice(tag)
        .is_ok()
}

fn tag_mac(
    mesh_key: &MeshKey,
    role: Role,
    sender: &NodePublic,
    exported: &[u8; 32],
) -> Hmac<Sha256> {
    // HMAC accepts keys of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(mesh_key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(TAG_LABEL);
    mac.update(&[match role {
        Role::Dialer => 1,
        Role::Acceptor => 2,
    }]);
    mac.update(sender.as_bytes());
    mac.update(exported);
    mac
}

/// How the QUIC mesh runs.
#[derive(Debug, Clone)]
pub struct QuicMeshOptions {
    /// UDP address to accept peers on; `None`: dial only (from an ephemeral IPv4 port).
    pub listen: Option<SocketAddr>,
    /// Peers to dial.
    pub peers: Vec<QuicPeer>,
    /// Packets queued per peer before new ones are dropped.
    pub queue_depth: usize,
    /// Keep-alive and idle timeout of every connection.
    pub timers: QuicTimers,
}

/// The running QUIC mesh; [`shutdown`](Self::shutdown) ends it.
#[derive(Debug)]
pub struct QuicMeshHandle {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    endpoint: Option<quinn::Endpoint>,
    local_addr: Option<SocketAddr>,
}

impl QuicMeshHandle {
    /// The UDP address accepting peers, if listening.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Stops every link and accepted connection (routes removed, peers told with
    /// CONNECTION_CLOSE) and waits for them to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(ep) = self.endpoint {
            ep.close(code::SHUTDOWN.into(), b"shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        }
    }
}

/// Starts the QUIC mesh: the listener (if `opts.listen`) and one link per peer. Nothing to do
/// (and no socket) when neither is configured.
pub fn start(
    server: &Arc<Server>,
    opts: QuicMeshOptions,
) -> Result<QuicMeshHandle, QuicConfigError> {
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    if opts.listen.is_none() && opts.peers.is_empty() {
        return Ok(QuicMeshHandle {
            stop,
            tasks,
            endpoint: None,
            local_addr: None,
        });
    }
    let mesh_key = server.config().mesh_key.ok_or(QuicConfigError::NoMeshKey)?;
    let endpoint = make_endpoint(opts.listen, opts.timers)?;
    let local_addr = opts.listen.and_then(|_| endpoint.local_addr().ok());
    if opts.listen.is_some() {
        tasks.push(tokio::spawn(accept_loop(
            server.clone(),
            mesh_key,
            endpoint.clone(),
            stop_rx.clone(),
        )));
    }
    for peer in opts.peers {
        let name = format!("quic:{}", peer.name);
        let link = LinkState::new(server, &name, opts.queue_depth, stop_rx.clone());
        let transport = QuicTransport {
            mesh_key,
            endpoint: endpoint.clone(),
            peer,
        };
        tasks.push(tokio::spawn(run_link(transport, link)));
    }
    Ok(QuicMeshHandle {
        stop,
        tasks,
        endpoint: Some(endpoint),
        local_addr,
    })
}

fn transport(timers: QuicTimers) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(MAX_UNI_STREAMS.into())
        .keep_alive_interval(Some(timers.keepalive))
        .max_idle_timeout(quinn::IdleTimeout::try_from(timers.idle_timeout).ok())
        .datagram_receive_buffer_size(Some(DATAGRAM_RECV_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_SEND_BUFFER);
    Arc::new(t)
}

fn make_endpoint(
    listen: Option<SocketAddr>,
    timers: QuicTimers,
) -> Result<quinn::Endpoint, QuicConfigError> {
    let tls_err = |e: &dyn std::fmt::Display| QuicConfigError::Tls(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .map_err(|e| tls_err(&e))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&e))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| tls_err(&e))?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let server_crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).map_err(|e| tls_err(&e))?;
    let client_crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).map_err(|e| tls_err(&e))?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_cfg.transport_config(transport(timers));
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_cfg.transport_config(transport(timers));
    let addr = listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let bind_err = |source| QuicConfigError::Bind { addr, source };
    let mut ep = match listen {
        Some(a) => quinn::Endpoint::server(server_cfg, a).map_err(bind_err)?,
        None => quinn::Endpoint::client(addr).map_err(bind_err)?,
    };
    ep.set_default_client_config(client_cfg);
    Ok(ep)
}

/// Accepts any certificate but still checks the handshake signature against it: the peer is
/// authenticated by the mesh key bound to this session (module doc), not by its certificate.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("connection: {0}")]
    Conn(#[from] quinn::ConnectionError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("presence stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("presence stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("sending a datagram: {0}")]
    Datagram(#[from] quinn::SendDatagramError),
    #[error("sending a stream: {0}")]
    Stream(#[from] quinn::ClosedStream),
    #[error("resolving {0}: no address")]
    Resolve(String),
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("presence stream ended")]
    StreamEnded,
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("unexpected control message {0:?}")]
    Unexpected(MeshMsg),
    #[error("wrong mesh key (authentication tag did not verify)")]
    Auth,
    #[error("TLS exporter: {0:?}")]
    Exporter(quinn::crypto::ExportKeyingMaterialError),
    #[error("stopping")]
    Stopped,
}

impl End {
    /// The `derp_mesh_quic_rejected` reason for ends caused by the peer's input.
    fn rejected_reason(&self) -> Option<&'static str> {
        match self {
            End::Auth => Some("auth"),
            End::Wire(WireError::UnknownType(_) | WireError::BadLength { .. }) => {
                Some("bad_message")
            }
            End::Wire(_) => Some("bad_packet"),
            End::Unexpected(_) => Some("bad_message"),
            _ => None,
        }
    }

    fn close_code(&self) -> u32 {
        match self {
            End::Auth => code::AUTH,
            End::Stopped => code::SHUTDOWN,
            _ => code::PROTOCOL,
        }
    }
}

/// Reads control messages from the presence stream.
struct MsgReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    /// The dialer's send half, kept open for the life of the connection (dropping it would
    /// finish the stream, which the acceptor reads as the end of the link).
    _send: Option<quinn::SendStream>,
}

impl MsgReader {
    fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            buf: BytesMut::with_capacity(4096),
            _send: None,
        }
    }

    async fn next(&mut self) -> Result<MeshMsg, End> {
        loop {
            if let Some((msg, n)) = MeshMsg::decode(&self.buf)? {
                let _ = self.buf.split_to(n);
                return Ok(msg);
            }
            let mut chunk = [0u8; 4096];
            match self.recv.read(&mut chunk).await? {
                Some(n) => self.buf.extend_from_slice(&chunk[..n]),
                None => return Err(End::StreamEnded),
            }
        }
    }
}

fn exported(conn: &quinn::Connection) -> Result<[u8; 32], End> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(End::Exporter)?;
    Ok(out)
}

fn hello(server: &Server, mesh_key: &MeshKey, role: Role, ekm: &[u8; 32]) -> Bytes {
    let key = server.public_key();
    let mut b = BytesMut::new();
    MeshMsg::Hello {
        server_key: key,
        tag: auth_tag(mesh_key, role, &key, ekm),
    }
    .encode(&mut b);
    b.freeze()
}

/// Reads the peer's Hello and checks its tag; returns the peer's DERP key.
async fn read_hello(
    reader: &mut MsgReader,
    mesh_key: &MeshKey,
    role: Role,
    ekm: &[u8; 32],
) -> Result<NodePublic, End> {
    match reader.next().await? {
        MeshMsg::Hello { server_key, tag } => {
            if verify_tag(mesh_key, role, &server_key, ekm, &tag) {
                Ok(server_key)
            } else {
                Err(End::Auth)
            }
        }
        m => Err(End::Unexpected(m)),
    }
}

/// Ends `conn` for `end`: counts and logs input the peer got wrong, and closes with a code.
fn close(server: &Server, conn: &quinn::Connection, peer: &str, end: &End) {
    if let Some(reason) = end.rejected_reason() {
        server
            .mesh_metrics
            .quic_rejected
            .with_label_values(&[reason])
            .inc();
        tracing::warn!(target: "derp", peer, remote = %conn.remote_address(),
            reason, "QUIC mesh connection refused: {end}");
    }
    conn.close(end.close_code().into(), end.to_string().as_bytes());
}

async fn accept_loop(
    server: Arc<Server>,
    mesh_key: MeshKey,
    endpoint: quinn::Endpoint,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            inc = endpoint.accept() => match inc {
                Some(inc) => {
                    conns.spawn(serve_inbound(server.clone(), mesh_key, inc, stop.clone()));
                }
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    // Each connection task sees the stop too; wait for them to say goodbye.
    while conns.join_next().await.is_some() {}
}

/// One accepted connection: authenticate, announce our clients, deliver the peer's packets.
async fn serve_inbound(
    server: Arc<Server>,
    mesh_key: MeshKey,
    incoming: quinn::Incoming,
    mut stop: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("timed out after {HANDSHAKE_TIMEOUT:?}"),
            };
            server
                .mesh_metrics
                .quic_rejected
                .with_label_values(&["handshake"])
                .inc();
            tracing::info!(target: "derp", %remote, "QUIC mesh handshake failed: {why}");
            return;
        }
    };
    let name = remote.to_string();
    let setup = async {
        let (mut send, recv) = conn.accept_bi().await?;
        let mut reader = MsgReader::new(recv);
        let ekm = exported(&conn)?;
        let peer_key = read_hello(&mut reader, &mesh_key, Role::Dialer, &ekm).await?;
        send.write_all(&hello(&server, &mesh_key, Role::Acceptor, &ekm))
            .await?;
        Ok::<_, End>((send, reader, peer_key))
    };
    let (send, reader, peer_key) = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, setup) => {
            match r.unwrap_or(Err(End::Timeout(HANDSHAKE_TIMEOUT))) {
                Ok(v) => v,
                Err(e) => {
                    close(&server, &conn, &name, &e);
                    if e.rejected_reason().is_none() {
                        tracing::info!(target: "derp", peer = %name, "QUIC mesh setup failed: {e}");
                    }
                    return;
                }
            }
        }
        _ = stop.changed() => {
            close(&server, &conn, &name, &End::Stopped);
            return;
        }
    };
    if peer_key == server.public_key() {
        // Our own link dialed us (this relay is in its own --mesh-quic-with): it hangs up.
        let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.closed()).await;
        return;
    }
    tracing::info!(target: "derp", peer = %name, %peer_key, "QUIC mesh peer connected");
    let feed = server.presence_feed(FEED_CAP);
    let end = tokio::select! {
        e = announce(&server, &feed, send) => e,
        e = receive_packets(&server, &conn, reader) => e,
        e = conn.closed() => End::Conn(e),
        _ = stop.changed() => End::Stopped,
    };
    server.drop_presence_feed(&feed);
    close(&server, &conn, &name, &end);
    tracing::info!(target: "derp", peer = %name, %peer_key, "QUIC mesh peer gone: {end}");
}

/// Sends our presence (complete list, then changes) on the stream until it fails.
async fn announce(server: &Server, feed: &Arc<PresenceFeed>, mut send: quinn::SendStream) -> End {
    let mut events = Vec::new();
    let mut buf = BytesMut::new();
    loop {
        if feed.next(&mut events).await {
            server.resync_presence(feed);
            continue;
        }
        for ev in events.drain(..) {
            match ev {
                PresenceEvent::SyncStart => MeshMsg::SyncStart,
                PresenceEvent::Present(k) => MeshMsg::Present(k),
                PresenceEvent::Gone(k) => MeshMsg::Gone(k),
                PresenceEvent::SyncEnd => MeshMsg::SyncEnd,
            }
            .encode(&mut buf);
        }
        if let Err(e) = send.write_all(&buf).await {
            return e.into();
        }
        buf.clear();
    }
}

/// Delivers the peer's packets (datagrams and oversized-packet streams) until the connection
/// fails or the peer sends something malformed. The dialer sends nothing more on the presence
/// stream: anything there is a protocol error.
async fn receive_packets(server: &Server, conn: &quinn::Connection, mut reader: MsgReader) -> End {
    let mut streams: JoinSet<Result<Bytes, End>> = JoinSet::new();
    let mut last_pair = 0u64;
    let mut loss = LossCount::new(server);
    loop {
        let unit = tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(d) => match decode_datagram(d) {
                    Ok((seq, dst, frame)) => {
                        loss.receive(seq);
                        server.deliver_forwarded(dst, frame, &mut last_pair);
                        continue;
                    }
                    Err(e) => return e.into(),
                },
                Err(e) => return e.into(),
            },
            s = conn.accept_uni() => match s {
                Ok(mut s) => {
                    streams.spawn(async move {
                        match tokio::time::timeout(STREAM_READ_TIMEOUT, s.read_to_end(PACKET_UNIT_MAX)).await {
                            Ok(Ok(v)) => Ok(Bytes::from(v)),
                            Ok(Err(quinn::ReadToEndError::TooLong)) => Err(End::Wire(WireError::LargePacket(PACKET_UNIT_MAX + 1))),
                            Ok(Err(quinn::ReadToEndError::Read(e))) => Err(End::Read(e)),
                            Err(_) => Err(End::Timeout(STREAM_READ_TIMEOUT)),
                        }
                    });
                    continue;
                }
                Err(e) => return e.into(),
            },
            Some(r) = streams.join_next(), if !streams.is_empty() => match r {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => return e,
                Err(_) => continue,
            },
            m = reader.next() => return match m {
                Ok(m) => End::Unexpected(m),
                Err(e) => e,
            },
        };
        match decode_packet(unit) {
            Ok((dst, frame)) => {
                server.deliver_forwarded(dst, frame, &mut last_pair);
            }
            Err(e) => return e.into(),
        }
    }
}

/// The receiving side's count of lost datagrams on one connection, published as it is found
/// and the rest when the connection ends (drop).
struct LossCount<'a> {
    server: &'a Server,
    loss: DatagramLoss,
    late: u64,
}

impl<'a> LossCount<'a> {
    fn new(server: &'a Server) -> Self {
        LossCount {
            server,
            loss: DatagramLoss::default(),
            late: 0,
        }
    }

    fn receive(&mut self, seq: u64) {
        let lost = self.loss.receive(seq);
        if lost > 0 {
            self.server.mesh_metrics.quic_datagrams_lost.inc_by(lost);
        }
        let late = self.loss.late();
        if late > self.late {
            self.server
                .mesh_metrics
                .quic_datagrams_late
                .inc_by(late - self.late);
            self.late = late;
        }
    }
}

impl Drop for LossCount<'_> {
    fn drop(&mut self) {
        let lost = self.loss.finish();
        self.server.mesh_metrics.quic_datagrams_lost.inc_by(lost);
    }
}

/// The QUIC mesh transport of one outbound link: dial the peer, learn its clients, send it
/// packets (the reconnect loop is [`run_link`]'s).
struct QuicTransport {
    mesh_key: MeshKey,
    endpoint: quinn::Endpoint,
    peer: QuicPeer,
}

impl LinkTransport for QuicTransport {
    type Conn = (quinn::Connection, MsgReader);
    type End = End;
    const LABEL: &'static str = "QUIC mesh";

    async fn dial(&mut self, server: &Server) -> Result<Dialed<Self::Conn>, End> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connect(server))
            .await
            .unwrap_or(Err(End::Timeout(HANDSHAKE_TIMEOUT)))
    }

    async fn serve(&mut self, link: &mut LinkState, (conn, reader): Self::Conn) -> End {
        let mut numbered = 0u64;
        let end = connected(link, &conn, reader, &mut numbered).await;
        close(&link.server, &conn, &link.name, &end);
        // Datagrams numbered but never sent died with the connection.
        let sent = conn.stats().frame_tx.datagram;
        link.fwd.count_discarded(numbered.saturating_sub(sent));
        end
    }

    fn stopped(end: &End) -> bool {
        matches!(end, End::Stopped)
    }
}

impl QuicTransport {
    /// Connects and exchanges Hellos. A wrong tag from the peer is counted and closes.
    async fn connect(
        &self,
        server: &Server,
    ) -> Result<Dialed<(quinn::Connection, MsgReader)>, End> {
        let addr = tokio::net::lookup_host(&self.peer.name)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| End::Resolve(self.peer.name.clone()))?;
        let conn = self.endpoint.connect(addr, SERVER_NAME)?.await?;
        let setup = async {
            let (mut send, recv) = conn.open_bi().await?;
            let ekm = exported(&conn)?;
            send.write_all(&hello(server, &self.mesh_key, Role::Dialer, &ekm))
                .await?;
            let mut reader = MsgReader::new(recv);
            let key = read_hello(&mut reader, &self.mesh_key, Role::Acceptor, &ekm).await?;
            reader._send = Some(send);
            Ok::<_, End>((reader, key))
        };
        match setup.await {
            Ok((reader, key)) => {
                if key == server.public_key() {
                    conn.close(code::SELF.into(), b"self");
                    return Ok(Dialed::Myself);
                }
                Ok(Dialed::Peer((conn, reader), key))
            }
            Err(e) => {
                close(server, &conn, &self.peer.name, &e);
                Err(e)
            }
        }
    }
}

/// Presence in and packets out until either fails or the link is stopped; `numbered` counts
/// the datagrams sent (their sequence numbers).
async fn connected(
    link: &mut LinkState,
    conn: &quinn::Connection,
    mut reader: MsgReader,
    numbered: &mut u64,
) -> End {
    let server = &link.server;
    let fwd = &link.fwd;
    let present = &mut link.present;
    let rx = &mut link.rx;
    let stream_packets = &server.mesh_metrics.quic_stream_packets;
    let mut stop = link.stop.clone();
    let read = async {
        // Keys of a complete list being received.
        let mut sync: Option<HashSet<NodePublic>> = None;
        loop {
            let msg = match reader.next().await {
                Ok(m) => m,
                Err(e) => return e,
            };
            match msg {
                MeshMsg::Present(key) => {
                    if let Some(s) = sync.as_mut() {
                        s.insert(key);
                    }
                    if key != server.public_key() && present.insert(key) {
                        server.mesh_peer_present(fwd, key);
                    }
                }
                MeshMsg::Gone(key) => {
                    if let Some(s) = sync.as_mut() {
                        s.remove(&key);
                    }
                    if present.remove(&key) {
                        server.mesh_peer_gone(fwd, key);
                    }
                }
                MeshMsg::SyncStart => sync = Some(HashSet::new()),
                MeshMsg::SyncEnd => {
                    let Some(s) = sync.take() else {
                        return End::Unexpected(MeshMsg::SyncEnd);
                    };
                    let stale: Vec<NodePublic> =
                        present.iter().filter(|k| !s.contains(k)).copied().collect();
                    for key in stale {
                        present.remove(&key);
                        server.mesh_peer_gone(fwd, key);
                    }
                }
                m @ MeshMsg::Hello { .. } => return End::Unexpected(m),
            }
        }
    };
    let write = async {
        while let Some(item) = rx.recv().await {
            let frame = item.recv_frame();
            if SEQ_LEN + KEY_LEN + frame.len() <= conn.max_datagram_size().unwrap_or(0) {
                let unit = encode_datagram(*numbered, &item.dst, frame);
                *numbered += 1;
                if let Err(e) = conn.send_datagram_wait(unit).await {
                    return End::from(e);
                }
            } else {
                let unit = encode_packet(&item.dst, frame);
                stream_packets.inc();
                let mut s = match conn.open_uni().await {
                    Ok(s) => s,
                    Err(e) => return End::from(e),
                };
                if let Err(e) = s.write_all(&unit).await {
                    return End::from(e);
                }
                if let Err(e) = s.finish() {
                    return End::from(e);
                }
            }
        }
        // The server (which holds the sender) is gone.
        End::Stopped
    };
    tokio::select! {
        end = read => end,
        end = write => end,
        _ = stop.changed() => End::Stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> NodePublic {
        NodePublic::from_bytes([b; 32])
    }

    #[test]
    fn tag_binds_key_role_sender_and_session() {
        let mk = MeshKey::from_bytes([1; 32]);
        let ekm = [9u8; 32];
        let t = auth_tag(&mk, Role::Dialer, &k(3), &ekm);
        assert!(verify_tag(&mk, Role::Dialer, &k(3), &ekm, &t));
        // Another mesh key, the other role (a reflected tag), another sender, another session.
        assert!(!verify_tag(
            &MeshKey::from_bytes([2; 32]),
            Role::Dialer,
            &k(3),
            &ekm,
            &t
        ));
        assert!(!verify_tag(&mk, Role::Acceptor, &k(3), &ekm, &t));
        assert!(!verify_tag(&mk, Role::Dialer, &k(4), &ekm, &t));
        assert!(!verify_tag(&mk, Role::Dialer, &k(3), &[8u8; 32], &t));
        let mut bad = t;
        bad[0] ^= 1;
        assert!(!verify_tag(&mk, Role::Dialer, &k(3), &ekm, &bad));
    }

    #[test]
    fn mesh_quic_with_is_host_port() {
        let p =
            parse_mesh_quic_with(" 10.0.0.1:4433, relay-b:4433,[::1]:4433,10.0.0.1:4433").unwrap();
        assert_eq!(
            p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["10.0.0.1:4433", "relay-b:4433", "[::1]:4433"]
        );
        assert!(parse_mesh_quic_with("").unwrap().is_empty());
        for bad in ["a", "a:0", "a:x", ":1", "a,,b:1", "::1:4433", "a:70000"] {
            assert!(parse_mesh_quic_with(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_mesh_quic_addr("").unwrap(), None);
        assert!(parse_mesh_quic_addr("127.0.0.1:1").unwrap().is_some());
        assert!(parse_mesh_quic_addr("localhost:1").is_err());
    }
}
