//! Temporary: Go client (coder/websocket + hashicorp/yamux + storj drpc) against our server.
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use coordinator::rpc::drpc::{serve, CallFuture, DrpcConfig, Handler, RpcError, RpcStream};
use coordinator::rpc::wsio::{WsConfig, WsIo, CLOSE_NORMAL};
use coordinator::rpc::yamux::{Config, Session};
use coordinator::rpc::RpcMetrics;

struct H;
impl Handler for H {
    fn call(self: Arc<Self>, method: &str, mut stream: RpcStream) -> Option<CallFuture> {
        match method {
            "/test.Svc/Echo" => Some(Box::pin(async move {
                let msg = stream.recv().await?.ok_or(RpcError::Closed)?;
                stream.send(msg).await
            })),
            "/test.Svc/Count" => Some(Box::pin(async move {
                let req = stream.recv().await?.ok_or(RpcError::Closed)?;
                for i in 0..req[0] {
                    stream.send(Bytes::from(vec![i])).await?;
                }
                stream.close().await
            })),
            "/test.Svc/Bidi" => Some(Box::pin(async move {
                let (tx, mut rx) = stream.split();
                while let Some(m) = rx.recv().await? {
                    tx.send(m).await?;
                }
                Ok(())
            })),
            "/test.Svc/Fail" => Some(Box::pin(async move { Err(RpcError::new(7, "it failed")) })),
            _ => None,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn go_client() {
    let metrics = Arc::new(RpcMetrics::new().unwrap());
    let m2 = metrics.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/rpc",
        get(move |up: WebSocketUpgrade| {
            let m = m2.clone();
            async move {
                up.on_upgrade(move |ws| async move {
                    let (io, h) = WsIo::new(
                        ws,
                        WsConfig {
                            ping_interval: Some(Duration::from_millis(200)),
                            ping_timeout: Duration::from_millis(500),
                            metrics: Some(m.clone()),
                            ..WsConfig::server()
                        },
                    );
                    let s = Session::server(
                        io,
                        Config {
                            keepalive_interval: Duration::from_millis(300),
                            connection_write_timeout: Duration::from_millis(500),
                            metrics: Some(m.clone()),
                            ..Config::default()
                        },
                    );
                    let end = serve(s, Arc::new(H), DrpcConfig { metrics: Some(m.clone()), ..Default::default() }).await;
                    eprintln!("server session end: {end:?}");
                    let ws_end = h.close(CLOSE_NORMAL, "").await;
                    eprintln!("server ws end: {ws_end:?}");
                })
                .into_response()
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let out = tokio::process::Command::new("/tmp/h4b-interop/h4b-interop")
        .arg(format!("ws://{addr}/rpc"))
        .output()
        .await
        .unwrap();
    eprintln!("go stdout: {}", String::from_utf8_lossy(&out.stdout));
    eprintln!("go stderr: {}", String::from_utf8_lossy(&out.stderr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    eprintln!(
        "metrics: yamux_proto={} keepalive={} drpc_proto={} unknown={} calls={} liveness={}",
        metrics.yamux_protocol_errors.get(),
        metrics.yamux_keepalive_timeouts.get(),
        metrics.drpc_protocol_errors.get(),
        metrics.drpc_unknown_methods.get(),
        metrics.drpc_calls.get(),
        metrics.ws_liveness_failures.get()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_client_go_server() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new("/tmp/h4b-gosrv/h4b-gosrv")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines.next_line().await.unwrap().unwrap();
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await.unwrap();
    let (io, wsh) = WsIo::new(ws, WsConfig::client());
    let session = Session::client(
        io,
        Config {
            keepalive_interval: Duration::from_millis(300),
            connection_write_timeout: Duration::from_millis(500),
            ..Config::default()
        },
    );
    let c = coordinator::rpc::drpc::RpcClient::new(session, DrpcConfig::default());
    for n in [0usize, 10, 70000, 1 << 20, (4 << 20) - 100] {
        let req = Bytes::from(vec![7u8; n]);
        let mut s = c.open_stream("/test.Svc/Echo").await.unwrap();
        s.send(req.clone()).await.unwrap();
        s.close_send().await.unwrap();
        let got = s.recv().await.unwrap().unwrap();
        assert_eq!(got, req);
        assert_eq!(s.recv().await.unwrap(), None);
    }
    let resp: prost_types::Duration = c
        .invoke_unary("/test.Svc/Echo", &prost_types::Duration { seconds: 5, nanos: 6 })
        .await
        .unwrap();
    assert_eq!(resp.seconds, 5);
    let err = c.invoke_unary::<_, prost_types::Duration>("/x.Y/Nope", &()).await.unwrap_err();
    eprintln!("unknown: {err:?}");
    assert!(err.is_unimplemented());
    let err = c.invoke_unary::<_, prost_types::Duration>("/test.Svc/Fail", &()).await.unwrap_err();
    assert_eq!(err, RpcError::new(7, "it failed"));
    let s = c.open_stream("/test.Svc/Bidi").await.unwrap();
    let (tx, mut rx) = s.split();
    for i in 0..50usize {
        let m = Bytes::from(vec![i as u8; i * 1000]);
        tx.send(m.clone()).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap(), m);
    }
    tx.close_send().await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), None);
    let mut s = c.open_stream("/test.Svc/Count").await.unwrap();
    s.send(Bytes::from_static(&[3])).await.unwrap();
    s.close_send().await.unwrap();
    for i in 0..3u8 {
        assert_eq!(s.recv().await.unwrap().unwrap(), Bytes::from(vec![i]));
    }
    assert_eq!(s.recv().await.unwrap(), None);
    c.session().ping().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!c.session().is_closed(), "keepalives both ways");
    c.invoke_unary::<_, prost_types::Duration>("/test.Svc/Echo", &prost_types::Duration::default()).await.unwrap();
    let _ = c.session().close().await;
    eprintln!("ws end: {:?}", wsh.close(CLOSE_NORMAL, "").await);
}
