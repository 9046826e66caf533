//! The whole v2 transport stack over real loopback WebSockets: tokio-tungstenite on both sides,
//! and axum's WebSocket on the server side; close codes, text messages and liveness pings.

/// Wrapped in a module named after the layer so that `cargo test -p coordinator rpc` runs it.
mod rpc {

    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use axum::extract::ws::WebSocketUpgrade;
    use axum::response::IntoResponse;
    use axum::routing::get;
    use axum::Router;
    use bytes::Bytes;
    use coordinator::rpc::drpc::{serve, CallFuture, DrpcConfig, Handler, RpcClient, RpcStream};
    use coordinator::rpc::wsio::{
        WsConfig, WsEnd, WsIo, CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR, CLOSE_NORMAL,
        CLOSE_UNSUPPORTED_DATA, LIVENESS_FAILED_REASON,
    };
    use coordinator::rpc::yamux::{Config, Session, SessionError};
    use coordinator::rpc::RpcMetrics;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio::time::timeout;
    use tokio_tungstenite::tungstenite::Message;

    const T: Duration = Duration::from_secs(20);

    struct Echo;

    impl Handler for Echo {
        fn call(self: Arc<Self>, method: &str, mut stream: RpcStream) -> Option<CallFuture> {
            match method {
                "/test.Svc/Echo" => Some(Box::pin(async move {
                    let m = stream
                        .recv()
                        .await?
                        .ok_or(coordinator::rpc::drpc::RpcError::Closed)?;
                    stream.send(m).await
                })),
                _ => None,
            }
        }
    }

    /// Serves one WebSocket the way the coordinator will: yamux server + dRPC, then the close code
    /// chosen from how the session ended. Reports the session end and the WebSocket end.
    async fn serve_ws<S, M, E>(ws: S, cfg: WsConfig, report: mpsc::Sender<(SessionError, WsEnd)>)
    where
        S: futures_util::Stream<Item = Result<M, E>>
            + futures_util::Sink<M, Error = E>
            + Send
            + Unpin
            + 'static,
        M: coordinator::rpc::wsio::WsMessage,
        E: std::fmt::Display + Send + 'static,
    {
        let (io, handle) = WsIo::new(ws, cfg);
        let session = Session::server(io, Config::default());
        let end = serve(session, Arc::new(Echo), DrpcConfig::default()).await;
        let ws_end = match &end {
            SessionError::Eof | SessionError::Closed => handle.close(CLOSE_NORMAL, "").await,
            e => handle.close(CLOSE_INTERNAL_ERROR, &e.to_string()).await,
        };
        let _ = report.send((end, ws_end)).await;
    }

    async fn tungstenite_server(
        cfg: WsConfig,
    ) -> (SocketAddr, mpsc::Receiver<(SessionError, WsEnd)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                let cfg = cfg.clone();
                tokio::spawn(async move {
                    if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                        serve_ws(ws, cfg, tx).await;
                    }
                });
            }
        });
        (addr, rx)
    }

    async fn axum_server(cfg: WsConfig) -> (SocketAddr, mpsc::Receiver<(SessionError, WsEnd)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::channel(16);
        let app = Router::new().route(
            "/rpc",
            get(move |up: WebSocketUpgrade| {
                let tx = tx.clone();
                let cfg = cfg.clone();
                async move {
                    up.max_message_size(coordinator::rpc::wsio::RECOMMENDED_MAX_MESSAGE_SIZE)
                        .on_upgrade(move |ws| serve_ws(ws, cfg, tx))
                        .into_response()
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (addr, rx)
    }

    async fn client(addr: SocketAddr, path: &str) -> (RpcClient, coordinator::rpc::wsio::WsHandle) {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
            .await
            .expect("connect");
        let (io, handle) = WsIo::new(ws, WsConfig::client());
        let session = Session::client(io, Config::default());
        (RpcClient::new(session, DrpcConfig::default()), handle)
    }

    async fn echo(c: &RpcClient, n: i64) {
        let req = prost_types::Duration {
            seconds: n,
            nanos: 1,
        };
        let resp: prost_types::Duration = timeout(T, c.invoke_unary("/test.Svc/Echo", &req))
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(resp, req);
    }

    #[tokio::test]
    async fn tungstenite_both_sides_drpc_and_bulk_yamux() {
        let (addr, mut ends) = tungstenite_server(WsConfig::server()).await;
        let (c, handle) = client(addr, "/").await;
        for i in 0..10 {
            echo(&c, i).await;
        }
        let err = c
            .invoke_unary::<_, prost_types::Duration>("/x.Y/Z", &())
            .await
            .expect_err("unknown");
        assert!(err.is_unimplemented());
        // Client goes away: the server's session ends with EOF and it closes the socket 1000.
        let _ = c.session().close().await;
        drop(c);
        let _ = timeout(T, handle.close(CLOSE_NORMAL, ""))
            .await
            .expect("client ws ends");
        let (end, _ws_end) = timeout(T, ends.recv())
            .await
            .expect("in time")
            .expect("report");
        assert!(matches!(end, SessionError::Eof), "{end:?}");
    }

    #[tokio::test]
    async fn yamux_five_mib_each_way_over_websocket() {
        // A raw yamux echo server over WebSocket (no dRPC): bulk data both ways at once.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let ws = tokio_tungstenite::accept_async(tcp).await.expect("ws");
            let (io, _h) = WsIo::new(ws, WsConfig::server());
            let mut session = Session::server(io, Config::default());
            let s = session.accept().await.expect("stream");
            let (mut rd, mut wr) = s.into_split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.shutdown().await;
            let _ = session.closed().await;
        });
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .expect("connect");
        let (io, _h) = WsIo::new(ws, WsConfig::client());
        let session = Session::client(io, Config::default());
        let s = session.open().await.expect("open");
        let (mut rd, mut wr) = s.into_split();
        const N: usize = 5 << 20;
        let data: Vec<u8> = (0..N).map(|i| (i * 7 + 3) as u8).collect();
        let expect = data.clone();
        let w = tokio::spawn(async move {
            wr.write_all(&data).await.expect("write");
            wr.shutdown().await.expect("fin");
            wr
        });
        let mut got = Vec::with_capacity(N);
        timeout(T, rd.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("read");
        assert!(got == expect, "echo corrupted");
        let _wr = w.await.expect("writer");
    }

    #[tokio::test]
    async fn axum_server_side_drpc() {
        let (addr, mut ends) = axum_server(WsConfig::server()).await;
        let (c, handle) = client(addr, "/rpc").await;
        for i in 0..5 {
            echo(&c, i).await;
        }
        let _ = c.session().close().await;
        let _ = timeout(T, handle.close(CLOSE_NORMAL, ""))
            .await
            .expect("client ws ends");
        let (end, ws_end) = timeout(T, ends.recv())
            .await
            .expect("in time")
            .expect("report");
        assert!(matches!(end, SessionError::Eof), "{end:?}");
        assert!(
            matches!(
                ws_end,
                WsEnd::ClosedByPeer { .. } | WsEnd::ClosedByUs { .. }
            ),
            "{ws_end:?}"
        );
    }

    /// Reads raw messages until a close frame; returns its code and reason.
    async fn read_close<S>(ws: &mut S) -> (u16, String)
    where
        S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
    {
        loop {
            let got = match timeout(T, ws.next()).await.expect("in time") {
                Some(Ok(Message::Close(Some(f)))) => (u16::from(f.code), f.reason.to_string()),
                Some(Ok(Message::Close(None))) => (0, String::new()),
                Some(Ok(_)) => continue,
                other => panic!("connection ended without close frame: {other:?}"),
            };
            // Poll once more so the library sends its close reply (a real peer keeps reading).
            let _ = timeout(Duration::from_millis(200), ws.next()).await;
            return got;
        }
    }

    #[tokio::test]
    async fn server_error_close_code_and_reason() {
        // Server side decides the code: 1011 with the error text.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let ws = tokio_tungstenite::accept_async(tcp).await.expect("ws");
            let (_io, handle) = WsIo::new(ws, WsConfig::server());
            handle.close(CLOSE_INTERNAL_ERROR, "boom").await
        });
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .expect("connect");
        let (code, reason) = read_close(&mut ws).await;
        assert_eq!((code, reason.as_str()), (CLOSE_INTERNAL_ERROR, "boom"));
        let end = timeout(T, server).await.expect("in time").expect("server");
        assert_eq!(
            end,
            WsEnd::ClosedByUs {
                code: CLOSE_INTERNAL_ERROR,
                reason: "boom".into()
            }
        );
    }

    #[tokio::test]
    async fn text_message_closes_1003() {
        let metrics = Arc::new(RpcMetrics::new().expect("metrics"));
        let cfg = WsConfig {
            metrics: Some(metrics.clone()),
            ..WsConfig::server()
        };
        let (addr, mut ends) = axum_server(cfg).await;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/rpc"))
            .await
            .expect("connect");
        ws.send(Message::text("hello")).await.expect("send text");
        let (code, _) = read_close(&mut ws).await;
        assert_eq!(code, CLOSE_UNSUPPORTED_DATA);
        let (end, ws_end) = timeout(T, ends.recv())
            .await
            .expect("in time")
            .expect("report");
        assert!(matches!(end, SessionError::Io(_)), "{end:?}");
        assert_eq!(ws_end, WsEnd::TextMessage);
        assert_eq!(metrics.ws_text_messages.get(), 1);
    }

    #[tokio::test]
    async fn unanswered_ping_closes_1001() {
        let metrics = Arc::new(RpcMetrics::new().expect("metrics"));
        let cfg = WsConfig {
            ping_interval: Some(Duration::from_millis(100)),
            ping_timeout: Duration::from_millis(200),
            close_grace: Duration::from_millis(300),
            metrics: Some(metrics.clone()),
            ..WsConfig::server()
        };
        let (addr, mut ends) = tungstenite_server(cfg).await;
        // A client that never reads, so it never answers pings.
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .expect("connect");
        let (_end, ws_end) = timeout(T, ends.recv())
            .await
            .expect("in time")
            .expect("report");
        assert_eq!(ws_end, WsEnd::LivenessFailed);
        assert_eq!(metrics.ws_liveness_failures.get(), 1);
        let (code, reason) = read_close(&mut ws).await;
        assert_eq!(
            (code, reason.as_str()),
            (CLOSE_GOING_AWAY, LIVENESS_FAILED_REASON)
        );
    }

    #[tokio::test]
    async fn answered_pings_keep_the_connection() {
        let cfg = WsConfig {
            ping_interval: Some(Duration::from_millis(50)),
            ping_timeout: Duration::from_millis(150),
            ..WsConfig::server()
        };
        let (addr, _ends) = tungstenite_server(cfg).await;
        let (c, _h) = client(addr, "/").await;
        echo(&c, 1).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        echo(&c, 2).await;
    }

    #[tokio::test]
    async fn binary_messages_are_one_byte_stream() {
        // Message boundaries carry no meaning: split a yamux ping frame across three messages.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let ws = tokio_tungstenite::accept_async(tcp).await.expect("ws");
            let (io, _h) = WsIo::new(ws, WsConfig::client());
            let session = Session::server(io, Config::default());
            let _ = session.closed().await;
        });
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .expect("connect");
        let ping = proto::yamux::Header::ping(proto::yamux::Flags::SYN, 77).encode();
        for part in [&ping[..3], &ping[3..9], &ping[9..]] {
            ws.send(Message::Binary(Bytes::copy_from_slice(part)))
                .await
                .expect("send");
        }
        let mut got = Vec::new();
        while got.len() < 12 {
            match timeout(T, ws.next()).await.expect("in time") {
                Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
                Some(Ok(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let reply = proto::yamux::Header::decode(&got)
            .expect("valid")
            .expect("complete");
        assert_eq!(
            reply,
            proto::yamux::Header::ping(proto::yamux::Flags::ACK, 77)
        );
    }
}
