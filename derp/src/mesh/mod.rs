//! Outbound DERP mesh links: this relay dialing its mesh peers the way derper does.
//!
//! Why it exists: a region served by several relays works only if each relay learns which keys
//! are on the others and hands them their packets. derper does that with one DERP client per
//! peer (`cmd/derper/mesh.go`, `derphttp.Client.RunWatchConnectionLoop`): it connects with the
//! server's own private key and the mesh key, sends WatchConns, turns every PeerPresent into a
//! route to that peer and every PeerGone into its removal, forwards packets for those keys with
//! ForwardPacket, and on a broken link forgets everything the peer announced and reconnects.
//! This module is that client; the routes and the bounded forward queue it drains belong to the
//! core ([`crate::core::mesh`]), so another transport (QUIC between tailnetd relays) can be put
//! behind the same [`MeshForwarder`] without touching the packet path.
//!
//! Peers are named in derper's `--mesh-with` syntax ([`parse_mesh_with`]): comma-separated
//! hostnames, each dialed as `https://HOST/derp`, optionally `HOST/DIALHOST` to connect to
//! another address while verifying HOST; an entry written as an `http://` or `https://` URL is
//! dialed as written (plain HTTP for tests). Like derper, a relay may list itself: the link sees
//! its own key on the first connect and stops for good.
//!
//! TLS trusts the bundled web PKI roots, the system bundle (or `SSL_CERT_FILE`, as Go programs
//! read it) and an optional extra CA file ([`load_trust`]).
//!
//! Must never: block the packet path (it only pushes into the bounded queue), keep routes of a
//! link that is down, or outlive [`MeshHandle::shutdown`].

pub mod quic;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::key::NodePublic;
use rand::Rng;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::dial::{dial, DialOptions, DialTls};
use crate::client::{ClientError, ClientReader, ClientWriter, ReceivedFrame};
use crate::core::mesh::{ForwardReceiver, MeshForwarder};
use crate::core::server::{Server, MESH_WRITE_TIMEOUT};

/// First reconnect delay; doubled per failure up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest reconnect delay (derper's fixed `retryInterval`).
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A link that stayed up this long starts over at [`RETRY_MIN`] when it breaks.
const STABLE_LINK: Duration = Duration::from_secs(10);
/// No frame from the peer for this long ends the link (the server sends KeepAlive every 60 s).
const READ_IDLE: Duration = Duration::from_secs(130);
/// Bytes of ForwardPacket frames batched into one write.
const WRITE_BATCH: usize = 64 << 10;

/// Reconnect pacing of a mesh link (DERP or QUIC): exponential backoff from [`RETRY_MIN`] to
/// [`RETRY_MAX`], jittered by up to a quarter so that a restarted region does not reconnect in
/// step, and started over after a link that stayed up [`STABLE_LINK`].
#[derive(Debug)]
pub(crate) struct Backoff {
    delay: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff { delay: RETRY_MIN }
    }

    /// The delay the next [`Backoff::wait`] starts from (for log lines).
    pub(crate) fn delay(&self) -> Duration {
        self.delay
    }

    /// A link that was up for `up_for` went down.
    pub(crate) fn link_ended(&mut self, up_for: Duration) {
        if up_for >= STABLE_LINK {
            self.delay = RETRY_MIN;
        }
    }

    /// Waits before the next attempt and doubles the delay. False if `stop` changed meanwhile.
    pub(crate) async fn wait(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let jitter = rand::thread_rng().gen_range(Duration::ZERO..=self.delay / 4);
        let go_on = tokio::select! {
            _ = tokio::time::sleep(self.delay + jitter) => true,
            _ = stop.changed() => false,
        };
        self.delay = (self.delay * 2).min(RETRY_MAX);
        go_on
    }
}

/// System CA bundles, in Go's order (`crypto/x509/root_linux.go`); the first that exists is used.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Errors in the mesh configuration.
#[derive(Debug, thiserror::Error)]
pub enum MeshConfigError {
    /// An entry of `--mesh-with` is not usable.
    #[error("mesh peer {entry:?}: {reason}")]
    BadPeer {
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Mesh peers were given without a mesh key.
    #[error("mesh peers require a mesh key (--mesh-psk-file)")]
    NoMeshKey,
    /// A CA file could not be read or holds no certificate.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// One mesh peer as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeer {
    /// The entry as written (log prefix and the `peer` metric label).
    pub name: String,
    /// The DERP URL dialed.
    pub url: String,
    /// Connect here instead of the URL's host (derper's `HOST/DIALHOST`).
    pub connect_host: Option<String>,
}

/// Parses derper's `--mesh-with`: comma-separated `HOST`, `HOST/DIALHOST`, or (tailnetd) a
/// full `http://` or `https://` URL. Blanks around entries are ignored; an empty list is none.
pub fn parse_mesh_with(list: &str) -> Result<Vec<MeshPeer>, MeshConfigError> {
    let mut peers = Vec::new();
    if list.trim().is_empty() {
        return Ok(peers);
    }
    for raw in list.split(',') {
        let entry = raw.trim();
        let bad = |reason| MeshConfigError::BadPeer {
            entry: entry.to_string(),
            reason,
        };
        if entry.is_empty() {
            return Err(bad("empty entry"));
        }
        let peer = if entry.starts_with("http://") || entry.starts_with("https://") {
            let uri: http::Uri = entry.parse().map_err(|_| bad("not a URL"))?;
            if uri.host().is_none_or(str::is_empty) {
                return Err(bad("URL without a host"));
            }
            MeshPeer {
                name: entry.to_string(),
                url: entry.to_string(),
                connect_host: None,
            }
        } else {
            let mut parts = entry.split('/');
            let host = parts.next().unwrap_or_default();
            let dial_host = parts.next();
            if parts.next().is_some() {
                return Err(bad("too many components in host tuple"));
            }
            if host.is_empty() || dial_host.is_some_and(str::is_empty) {
                return Err(bad("empty host"));
            }
            let url = format!("https://{host}/derp");
            url.parse::<http::Uri>()
                .map_err(|_| bad("not a host[:port]"))?;
            MeshPeer {
                name: host.to_string(),
                url,
                connect_host: dial_host.map(str::to_string),
            }
        };
        if !peers.iter().any(|p: &MeshPeer| p.name == peer.name) {
            peers.push(peer);
        }
    }
    Ok(peers)
}

/// Extra roots for outbound mesh TLS: the system bundle (`SSL_CERT_FILE` instead when set, as
/// in Go) and `ca_file`. Certificates of the system bundle that do not parse are skipped; in
/// `SSL_CERT_FILE` or `ca_file` they are an error, as is a file without any.
pub fn load_trust(ca_file: Option<&Path>) -> Result<Vec<CertificateDer<'static>>, MeshConfigError> {
    let mut roots = Vec::new();
    match std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()) {
        Some(path) => roots.extend(read_pem_certs(Path::new(&path), true)?),
        None => {
            if let Some(path) = SYSTEM_CA_FILES.iter().map(Path::new).find(|p| p.exists()) {
                roots.extend(read_pem_certs(path, false)?);
            }
        }
    }
    if let Some(path) = ca_file {
        roots.extend(read_pem_certs(path, true)?);
    }
    Ok(roots)
}

fn read_pem_certs(
    path: &Path,
    strict: bool,
) -> Result<Vec<CertificateDer<'static>>, MeshConfigError> {
    let err = |reason: String| MeshConfigError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| err(format!("bad PEM: {e}")))?;
        match store.add(cert.clone()) {
            Ok(()) => out.push(cert),
            Err(e) if strict => return Err(err(format!("unusable certificate: {e}"))),
            Err(_) => {}
        }
    }
    if strict && out.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(out)
}

/// How the links are made.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// The peers to dial.
    pub peers: Vec<MeshPeer>,
    /// Extra trusted roots for `https://` peers (see [`load_trust`]).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Packets queued per peer before new ones are dropped.
    pub queue_depth: usize,
}

/// The running links; [`shutdown`](Self::shutdown) ends them.
#[derive(Debug)]
pub struct MeshHandle {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl MeshHandle {
    /// Stops every link (their routes are removed) and waits for them to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts one link per peer. Needs the server's mesh key if there is any peer.
pub fn start(server: &Arc<Server>, opts: MeshOptions) -> Result<MeshHandle, MeshConfigError> {
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    if !opts.peers.is_empty() && server.config().mesh_key.is_none() {
        return Err(MeshConfigError::NoMeshKey);
    }
    for peer in opts.peers {
        let link = LinkState::new(server, &peer.name, opts.queue_depth, stop_rx.clone());
        let transport = DerpTransport {
            peer,
            extra_roots: opts.extra_roots.clone(),
        };
        tasks.push(tokio::spawn(run_link(transport, link)));
    }
    Ok(MeshHandle { stop, tasks })
}

/// Why a connected link ended.
#[derive(Debug, thiserror::Error)]
enum LinkEnd {
    #[error("{0}")]
    Dial(#[from] crate::client::dial::DialError),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("no frame from the peer for {0:?}")]
    Idle(Duration),
    #[error("writing ForwardPacket frames stalled for {0:?}")]
    WriteStalled(Duration),
    #[error("stopping")]
    Stopped,
}

/// A mesh transport's part of a link: dialing one peer and serving one connection. The rest
/// (reconnecting with [`Backoff`], the link's up/down state, dropping its routes when it is
/// down, stopping) is [`run_link`]'s, the same for the DERP and the QUIC mesh.
pub(crate) trait LinkTransport {
    /// A connected, authenticated connection to the peer.
    type Conn;
    /// Why a connection attempt or a connection ended.
    type End: std::fmt::Display;
    /// Log prefix ("mesh", "QUIC mesh").
    const LABEL: &'static str;

    /// Connects and authenticates, within the transport's own deadline.
    async fn dial(&mut self, server: &Server) -> Result<Dialed<Self::Conn>, Self::End>;

    /// Runs one connection: the peer's presence into `link.present` (routes through the
    /// server), packets from `link.rx` out, until either fails or `link.stop` fires.
    async fn serve(&mut self, link: &mut LinkState, conn: Self::Conn) -> Self::End;

    /// Whether `end` means the link was stopped (not a failure to retry).
    fn stopped(end: &Self::End) -> bool;
}

/// What a dial reached.
pub(crate) enum Dialed<C> {
    /// The peer, with its DERP public key.
    Peer(C, NodePublic),
    /// This relay itself (it is in its own peer list): the link stops for good.
    Myself,
}

/// The transport-independent state of one outbound link.
pub(crate) struct LinkState {
    pub(crate) server: Arc<Server>,
    pub(crate) fwd: Arc<MeshForwarder>,
    pub(crate) rx: ForwardReceiver,
    /// The peer as configured (log field).
    pub(crate) name: String,
    /// Keys the peer announced on the current connection.
    pub(crate) present: HashSet<NodePublic>,
    pub(crate) stop: watch::Receiver<bool>,
}

impl LinkState {
    /// A link to the peer `name` (also its metric label) with a forward queue of `depth`.
    pub(crate) fn new(
        server: &Arc<Server>,
        name: &str,
        depth: usize,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let (fwd, rx) = server.add_mesh_peer(name, depth);
        LinkState {
            server: server.clone(),
            fwd,
            rx,
            name: name.to_string(),
            present: HashSet::new(),
            stop,
        }
    }

    /// Drops every route the peer announced and every packet still queued for it.
    fn forget(&mut self, label: &str) {
        let n = self
            .server
            .mesh_link_down(&self.fwd, &mut self.present, &mut self.rx);
        if n > 0 {
            tracing::info!(target: "derp", peer = %self.name,
                "{label}: cleared {n} forwarding mappings");
        }
    }
}

/// One outbound link until stopped: dial, serve, and on failure forget the peer's routes and
/// redial after a backoff.
pub(crate) async fn run_link<T: LinkTransport>(mut transport: T, mut link: LinkState) {
    let label = T::LABEL;
    let name = link.name.clone();
    let mut backoff = Backoff::new();
    loop {
        if *link.stop.borrow() {
            break;
        }
        let mut stop = link.stop.clone();
        let dialed = tokio::select! {
            d = transport.dial(&link.server) => d,
            _ = stop.changed() => break,
        };
        match dialed {
            Err(e) => {
                tracing::info!(target: "derp", peer = %name,
                    "{label} connect: {e}; retrying in {:?}", backoff.delay());
            }
            Ok(Dialed::Myself) => {
                tracing::info!(target: "derp", peer = %name,
                    "{label}: detected self-connect; ignoring host");
                break;
            }
            Ok(Dialed::Peer(conn, peer_key)) => {
                let since = tokio::time::Instant::now();
                tracing::info!(target: "derp", peer = %name, %peer_key, "{label} link up");
                link.fwd.set_connected(true);
                let end = transport.serve(&mut link, conn).await;
                link.fwd.set_connected(false);
                link.forget(label);
                if T::stopped(&end) {
                    break;
                }
                tracing::info!(target: "derp", peer = %name, "{label} link down: {end}");
                backoff.link_ended(since.elapsed());
            }
        }
        if !backoff.wait(&mut link.stop).await {
            break;
        }
    }
    link.fwd.set_connected(false);
    link.forget(label);
}

/// The DERP mesh transport: a DERP client with the server's key and the mesh key.
struct DerpTransport {
    peer: MeshPeer,
    extra_roots: Vec<CertificateDer<'static>>,
}

impl LinkTransport for DerpTransport {
    type Conn = (ClientReader, ClientWriter);
    type End = LinkEnd;
    const LABEL: &'static str = "mesh";

    async fn dial(&mut self, server: &Server) -> Result<Dialed<Self::Conn>, LinkEnd> {
        let d = dial(&self.peer.url, self.dial_options(server)).await?;
        let key = d.client.server_public_key();
        if key == server.public_key() {
            return Ok(Dialed::Myself);
        }
        Ok(Dialed::Peer(d.client.split(), key))
    }

    async fn serve(&mut self, link: &mut LinkState, conn: Self::Conn) -> LinkEnd {
        serve_derp(link, conn.0, conn.1).await
    }

    fn stopped(end: &LinkEnd) -> bool {
        matches!(end, LinkEnd::Stopped)
    }
}

impl DerpTransport {
    fn dial_options(&self, server: &Server) -> DialOptions {
        let cfg = server.config();
        let mut o = DialOptions::new(cfg.private_key.clone());
        o.mesh_key = cfg.mesh_key;
        o.tls = DialTls {
            extra_roots: self.extra_roots.clone(),
            ..DialTls::default()
        };
        o.connect_host = self.peer.connect_host.clone();
        o
    }
}

/// Runs one DERP mesh connection: WatchConns, then presence in and packets out until either
/// fails or the link is stopped.
async fn serve_derp(
    link: &mut LinkState,
    mut reader: ClientReader,
    mut writer: ClientWriter,
) -> LinkEnd {
    if let Err(e) = writer.watch_conns().await {
        return e.into();
    }
    let server = &link.server;
    let fwd = &link.fwd;
    let present = &mut link.present;
    let rx = &mut link.rx;
    let mut stop = link.stop.clone();
    let read = async {
        loop {
            let frame = match tokio::time::timeout(READ_IDLE, reader.recv()).await {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => return LinkEnd::from(e),
                Err(_) => return LinkEnd::Idle(READ_IDLE),
            };
            let (key, is_present) = match frame {
                ReceivedFrame::PeerPresent { key, .. } => (key, true),
                ReceivedFrame::PeerGone { key, .. } => (key, false),
                _ => continue,
            };
            if is_present {
                // Our own mesh connection to the peer is one of its clients: not a route.
                if key != server.public_key() && present.insert(key) {
                    server.mesh_peer_present(fwd, key);
                }
            } else if present.remove(&key) {
                server.mesh_peer_gone(fwd, key);
            }
        }
    };
    let write = async {
        while let Some(item) = rx.recv().await {
            let mut batch = Some(item);
            while let Some(it) = batch.take() {
                if let Err(e) = writer.buffer_forward_packet(it.src(), it.dst, it.payload()) {
                    return LinkEnd::from(e);
                }
                if writer.buffered() < WRITE_BATCH {
                    batch = rx.try_recv().ok();
                }
            }
            match tokio::time::timeout(MESH_WRITE_TIMEOUT, writer.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return LinkEnd::from(e),
                Err(_) => return LinkEnd::WriteStalled(MESH_WRITE_TIMEOUT),
            }
        }
        // The server (which holds the sender) is gone.
        LinkEnd::Stopped
    };
    tokio::select! {
        end = read => end,
        end = write => end,
        _ = stop.changed() => LinkEnd::Stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_its_cap_starts_over_after_a_stable_link_and_stops() {
        let (tx, mut stop) = watch::channel(false);
        let mut b = Backoff::new();
        for _ in 0..6 {
            let d = b.delay();
            let t = tokio::time::Instant::now();
            assert!(b.wait(&mut stop).await);
            let waited = t.elapsed();
            // The delay plus up to a quarter of it, then doubled up to the cap.
            assert!(waited >= d && waited <= d + d / 4, "{waited:?} for {d:?}");
            assert_eq!(b.delay(), (d * 2).min(RETRY_MAX));
        }
        assert_eq!(b.delay(), RETRY_MAX);
        b.link_ended(STABLE_LINK / 2);
        assert_eq!(b.delay(), RETRY_MAX, "a short-lived link keeps the delay");
        b.link_ended(STABLE_LINK);
        assert_eq!(b.delay(), RETRY_MIN, "a stable link starts over");
        tx.send(true).unwrap();
        assert!(!b.wait(&mut stop).await, "a stop ends the wait");
    }

    #[test]
    fn mesh_with_follows_derper_syntax() {
        let p = parse_mesh_with(
            "derp1.example.com, derp2.example.com:8443/10.0.0.2,http://127.0.0.1:3340/derp",
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].url, "https://derp1.example.com/derp");
        assert_eq!(p[0].connect_host, None);
        assert_eq!(p[1].name, "derp2.example.com:8443");
        assert_eq!(p[1].url, "https://derp2.example.com:8443/derp");
        assert_eq!(p[1].connect_host.as_deref(), Some("10.0.0.2"));
        assert_eq!(p[2].url, "http://127.0.0.1:3340/derp");
        assert!(parse_mesh_with("").unwrap().is_empty());
        assert!(parse_mesh_with("a,,b").is_err());
        assert!(parse_mesh_with("a/b/c").is_err());
        assert!(parse_mesh_with("a/").is_err());
        assert_eq!(parse_mesh_with("a,a").unwrap().len(), 1);
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(read_pem_certs(&empty, true).is_err());
        assert!(read_pem_certs(&empty, false).unwrap().is_empty());
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, cert.cert.pem()).unwrap();
        assert_eq!(read_pem_certs(&good, true).unwrap().len(), 1);
        assert!(read_pem_certs(&dir.path().join("missing.pem"), true).is_err());
    }
}
