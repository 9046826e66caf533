//! The `core_*` tests' relay: a real [`Server`] behind a tiny loopback accept loop (no HTTP),
//! with Rust clients, and a transport that splits every read and write ([`ChunkedIo`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use derp::{Client, ClientOptions, ConnInfo, Server, ServerConfig};
use proto::key::NodePrivate;
use tokio::net::{TcpListener, TcpStream};

use super::{expect_server_info, key, metric, recv_packet, wait_until};

pub struct TestServer {
    pub server: Arc<Server>,
    pub addr: SocketAddr,
    pub registry: prometheus::Registry,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::with_config(|_| {}).await
    }

    pub async fn with_config(f: impl FnOnce(&mut ServerConfig)) -> TestServer {
        Self::with_config_io(f, false).await
    }

    /// Like [`with_config`], but the server sees every connection through [`ChunkedIo`]
    /// (tiny partial reads and writes, no vectored writes).
    pub async fn chunked() -> TestServer {
        Self::with_config_io(|_| {}, true).await
    }

    pub async fn with_config_io(f: impl FnOnce(&mut ServerConfig), chunked: bool) -> TestServer {
        let mut cfg = ServerConfig::new(key());
        f(&mut cfg);
        let registry = prometheus::Registry::new();
        let server = Server::new(cfg, &registry).expect("server");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let srv = server.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                if chunked {
                    let io = ChunkedIo {
                        inner: tcp,
                        max_read: 700,
                        max_write: 1000,
                    };
                    tokio::spawn(srv.accept(io, Bytes::new(), ConnInfo::new(peer)));
                } else {
                    tokio::spawn(srv.accept(tcp, Bytes::new(), ConnInfo::new(peer)));
                }
            }
        });
        TestServer {
            server,
            addr,
            registry,
            accept_task,
        }
    }

    /// Connects a client with a fresh key and waits for ServerInfo.
    pub async fn client(&self) -> Client {
        self.client_with(key(), ClientOptions::default()).await
    }

    pub async fn client_with(&self, k: NodePrivate, opts: ClientOptions) -> Client {
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let mut c = Client::handshake(tcp, Bytes::new(), k, opts)
            .await
            .expect("handshake");
        assert_eq!(c.server_public_key(), self.server.public_key());
        expect_server_info(&mut c).await;
        // Registration happens before ServerInfo is written, so the key is routable now.
        c
    }

    pub async fn raw(&self) -> TcpStream {
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        tcp
    }

    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.registry, series)
    }

    /// Waits until the metric equals `want` (metrics of other tasks land asynchronously).
    pub async fn wait_metric(&self, series: &str, want: f64) {
        let ok = wait_until(|| self.metric(series) == want).await;
        assert!(ok, "{series} = {}, want {want}", self.metric(series));
    }

    pub async fn wait_connections(&self, n: usize) {
        let ok = wait_until(|| self.server.connection_count() == n).await;
        assert!(
            ok,
            "connections = {}, want {n}",
            self.server.connection_count()
        );
    }
}

/// A relaying pair (a → b) used to show that other connections are unaffected.
pub async fn assert_pair_relays(ts: &TestServer, a: &mut Client, b: &mut Client, tag: &[u8]) {
    a.send_packet(b.public_key(), tag).await.expect("send");
    let (src, data) = recv_packet(b).await;
    assert_eq!(src, a.public_key());
    assert_eq!(&data[..], tag);
    let _ = ts;
}

/// A transport that reads and writes at most a few hundred bytes per call and does not
/// support vectored writes: exercises partial frames and the coalescing write path (as a
/// WebSocket or other non-vectored transport would).
pub struct ChunkedIo<T> {
    pub inner: T,
    pub max_read: usize,
    pub max_write: usize,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ChunkedIo<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let max = self.max_read.min(buf.remaining());
        let mut tmp = vec![0u8; max];
        let mut rb = tokio::io::ReadBuf::new(&mut tmp);
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
            std::task::Poll::Ready(Ok(())) => {
                buf.put_slice(rb.filled());
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ChunkedIo<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.max_write);
        std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
