//! One relay of a test region, for the mesh tests (`edge_mesh` over TCP, `edge_quic_mesh` over
//! QUIC): a server holding the region's mesh key, its HTTP edge on a listener the test bound (so
//! that a relay restarted in process gets its port back), and the mesh links the test starts on
//! it. The two tests differ only in those links.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use derp::edge::http::HttpEdge;
use derp::edge::listener::{self, ListenerOptions};
use derp::edge::tls::TlsReloader;
use derp::mesh::quic::QuicMeshHandle;
use derp::mesh::MeshHandle;
use derp::{Server, ServerConfig};
use proto::key::{MeshKey, NodePrivate, NodePublic};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{fallback, metric_matching, wait_until};

/// The mesh links a [`RegionRelay`] runs.
pub enum MeshLinks {
    Tcp(MeshHandle),
    Quic(QuicMeshHandle),
}

pub struct RegionRelay {
    pub server: Arc<Server>,
    pub registry: prometheus::Registry,
    cancel: CancellationToken,
    links: Option<MeshLinks>,
}

impl RegionRelay {
    /// Starts the server and its edge on `listener`, serving TLS with `tls` (certificate and key
    /// files) when given. No mesh links yet: see [`RegionRelay::with_links`].
    pub fn serve(
        key: &NodePrivate,
        mesh_key: MeshKey,
        listener: TcpListener,
        tls: Option<(&Path, &Path)>,
    ) -> RegionRelay {
        let registry = prometheus::Registry::new();
        let mut cfg = ServerConfig::new(key.clone());
        cfg.mesh_key = Some(mesh_key);
        cfg.queue_depth = 1024;
        let server = Server::new(cfg, &registry).expect("server");
        let edge = HttpEdge::new(Some(server.clone()), fallback(), &registry).expect("edge");
        let server_tls = tls.map(|(cert, key)| {
            let reloader = Arc::new(TlsReloader::new(cert, key, None, &registry).expect("tls"));
            reloader.server_config().expect("tls config")
        });
        let cancel = CancellationToken::new();
        tokio::spawn(listener::serve(
            listener,
            server_tls,
            edge,
            ListenerOptions::default(),
            cancel.clone(),
        ));
        RegionRelay {
            server,
            registry,
            cancel,
            links: None,
        }
    }

    /// This relay, running `links` (stopped by [`RegionRelay::kill`]).
    pub fn with_links(mut self, links: MeshLinks) -> RegionRelay {
        self.links = Some(links);
        self
    }

    /// Stops everything: the mesh links, the listener, every connection.
    pub async fn kill(mut self) {
        match self.links.take() {
            Some(MeshLinks::Tcp(links)) => links.shutdown().await,
            Some(MeshLinks::Quic(links)) => links.shutdown().await,
            None => {}
        }
        self.cancel.cancel();
        self.server.shutdown_with(Duration::from_secs(2)).await;
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_matching(&self.registry, name, labels)
    }

    /// Waits until every key of `keys` is routed to a mesh peer here.
    pub async fn wait_routes(&self, keys: &[NodePublic]) {
        let ok = wait_until(|| keys.iter().all(|k| self.server.mesh_route_of(k).is_some())).await;
        assert!(ok, "mesh routes for {keys:?} never appeared");
    }
}
