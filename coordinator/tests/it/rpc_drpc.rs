//! dRPC server/client tests over yamux on in-memory pipes, including byte-exact Go-style
//! sequences from the reference (§3.3.8).

/// Wrapped in a module named after the layer so that `cargo test -p coordinator rpc` runs it.
mod rpc {

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::{Bytes, BytesMut};
    use coordinator::rpc::drpc::{
        serve, CallFuture, DrpcConfig, Handler, RawInvoke, RpcClient, RpcError, RpcStream,
        TakeOverFuture,
    };
    use coordinator::rpc::yamux::{Config, Session, Stream};
    use coordinator::rpc::RpcMetrics;
    use proto::drpc::{encode_metadata, encode_packet, Frame, Kind, UNIMPLEMENTED};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::timeout;

    const T: Duration = Duration::from_secs(20);

    /// `/test.Svc/Echo` unary echo; `/test.Svc/Count` server-streams N messages (N = first byte of the
    /// request) then closes; `/test.Svc/Bidi` echoes until CloseSend; `/test.Svc/Hang` waits for
    /// cancellation and records that its future was dropped; `/test.Svc/Fail` returns an error;
    /// `/test.Svc/Meta` replies with its metadata value for key "k".
    struct TestHandler {
        hang_dropped: Arc<AtomicBool>,
        taken: Arc<Mutex<Option<(String, Bytes)>>>,
    }

    struct DropFlag(Arc<AtomicBool>);
    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Handler for TestHandler {
        fn call(self: Arc<Self>, method: &str, mut stream: RpcStream) -> Option<CallFuture> {
            match method {
                "/test.Svc/Echo" => Some(Box::pin(async move {
                    let msg = stream.recv().await?.ok_or(RpcError::Closed)?;
                    stream.send(msg).await
                })),
                "/test.Svc/Count" => Some(Box::pin(async move {
                    let req = stream.recv().await?.ok_or(RpcError::Closed)?;
                    let n = req.first().copied().unwrap_or(0);
                    for i in 0..n {
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
                "/test.Svc/Hang" => {
                    let flag = DropFlag(self.hang_dropped.clone());
                    Some(Box::pin(async move {
                        let _flag = flag;
                        let _ = stream.recv().await;
                        std::future::pending::<()>().await;
                        Ok(())
                    }))
                }
                "/test.Svc/Fail" => {
                    Some(Box::pin(async move { Err(RpcError::new(7, "it failed")) }))
                }
                "/test.Svc/Meta" => Some(Box::pin(async move {
                    let v = stream.metadata().get("k").cloned().unwrap_or_default();
                    stream.send(Bytes::from(v)).await
                })),
                _ => None,
            }
        }

        fn take_over(
            self: Arc<Self>,
            raw: Box<RawInvoke>,
        ) -> Result<TakeOverFuture, Box<RawInvoke>> {
            if raw.method != "/proxy.Svc/Forward" {
                return Err(raw);
            }
            let taken = self.taken.clone();
            Ok(Box::pin(async move {
                let RawInvoke {
                    method,
                    consumed,
                    mut writer,
                    ..
                } = *raw;
                if let Ok(mut g) = taken.lock() {
                    *g = Some((method, consumed));
                }
                let _ = writer.write_all(b"taken").await;
                let _ = writer.shutdown().await;
            }))
        }
    }

    struct Fixture {
        client: RpcClient,
        handler: Arc<TestHandler>,
        metrics: Arc<RpcMetrics>,
    }

    fn fixture() -> Fixture {
        let metrics = Arc::new(RpcMetrics::new().expect("metrics"));
        let (a, b) = tokio::io::duplex(256 * 1024);
        let server = Session::server(a, Config::default());
        let client = Session::client(b, Config::default());
        let handler = Arc::new(TestHandler {
            hang_dropped: Arc::new(AtomicBool::new(false)),
            taken: Arc::new(Mutex::new(None)),
        });
        let cfg = DrpcConfig {
            metrics: Some(metrics.clone()),
            ..DrpcConfig::default()
        };
        tokio::spawn(serve(server, handler.clone(), cfg.clone()));
        Fixture {
            client: RpcClient::new(client, cfg),
            handler,
            metrics,
        }
    }

    fn packet(stream: u64, msg: u64, kind: Kind, data: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_packet(stream, msg, kind, data, &mut b);
        b.to_vec()
    }

    /// Reads exactly `n` frames from a raw yamux stream (Go clients keep the stream open until the
    /// call is over, so the tests do too).
    async fn read_frames(s: &mut Stream, n: usize) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        while frames.len() < n {
            while let Some(f) = Frame::decode(&mut buf).expect("valid frames") {
                frames.push(f);
            }
            if frames.len() >= n {
                break;
            }
            let got = timeout(T, s.read_buf(&mut buf))
                .await
                .expect("in time")
                .expect("read");
            assert!(got > 0, "EOF after {} frames", frames.len());
        }
        assert!(buf.is_empty(), "trailing bytes");
        frames
    }

    #[tokio::test]
    async fn unary_echo() {
        let f = fixture();
        let req = prost_types::Duration {
            seconds: 42,
            nanos: 7,
        };
        let resp: prost_types::Duration = timeout(T, f.client.invoke_unary("/test.Svc/Echo", &req))
            .await
            .expect("in time")
            .expect("call");
        assert_eq!(resp, req);
        // Many sequential calls, each on its own yamux stream.
        for i in 0..20 {
            let req = prost_types::Duration {
                seconds: i,
                nanos: 0,
            };
            let resp: prost_types::Duration = f
                .client
                .invoke_unary("/test.Svc/Echo", &req)
                .await
                .expect("call");
            assert_eq!(resp.seconds, i);
        }
        assert!(f.metrics.drpc_calls.get() >= 21);
    }

    #[tokio::test]
    async fn server_streaming_ends_with_close() {
        let f = fixture();
        let mut s = f.client.open_stream("/test.Svc/Count").await.expect("open");
        s.send(Bytes::from_static(&[5])).await.expect("send");
        s.close_send().await.expect("close send");
        for i in 0..5u8 {
            let m = timeout(T, s.recv()).await.expect("in time").expect("recv");
            assert_eq!(m.as_deref(), Some(&[i][..]));
        }
        assert_eq!(
            timeout(T, s.recv()).await.expect("in time").expect("end"),
            None
        );
    }

    #[tokio::test]
    async fn bidi_echo_and_large_messages() {
        let f = fixture();
        let s = f.client.open_stream("/test.Svc/Bidi").await.expect("open");
        let (tx, mut rx) = s.split();
        let sizes = [0usize, 1, 100, 64 * 1024, 64 * 1024 + 1, 1 << 20, 4 << 20];
        let sender = tokio::spawn(async move {
            for (i, n) in sizes.iter().enumerate() {
                let body: Vec<u8> = (0..*n).map(|j| (i + j) as u8).collect();
                tx.send(Bytes::from(body)).await.expect("send");
            }
            tx.close_send().await.expect("close send");
        });
        for (i, n) in sizes.iter().enumerate() {
            let m = timeout(T, rx.recv())
                .await
                .expect("in time")
                .expect("recv")
                .expect("message");
            assert_eq!(m.len(), *n);
            assert!(m.iter().enumerate().all(|(j, b)| *b == (i + j) as u8));
        }
        assert_eq!(
            timeout(T, rx.recv()).await.expect("in time").expect("end"),
            None
        );
        sender.await.expect("sender");
    }

    #[tokio::test]
    async fn too_large_message_refused_locally() {
        let f = fixture();
        let s = f.client.open_stream("/test.Svc/Bidi").await.expect("open");
        let err = s
            .send(Bytes::from(vec![0u8; (4 << 20) + 1]))
            .await
            .expect_err("too large");
        assert_eq!(err, RpcError::TooLarge((4 << 20) + 1));
    }

    #[tokio::test]
    async fn unknown_method_is_unimplemented() {
        let f = fixture();
        let err = timeout(
            T,
            f.client
                .invoke_unary::<_, prost_types::Duration>("/coder.tailnet.v2.Tailnet/Nope", &()),
        )
        .await
        .expect("in time")
        .expect_err("unknown");
        assert_eq!(err.code(), UNIMPLEMENTED);
        assert!(err.is_unimplemented());
        assert_eq!(
            err.to_string(),
            "protocol error: unknown rpc: \"/coder.tailnet.v2.Tailnet/Nope\""
        );
        assert_eq!(f.metrics.drpc_unknown_methods.get(), 1);
    }

    #[tokio::test]
    async fn handler_error_becomes_error_packet() {
        let f = fixture();
        let err = f
            .client
            .invoke_unary::<_, prost_types::Duration>("/test.Svc/Fail", &())
            .await
            .expect_err("fails");
        assert_eq!(err, RpcError::new(7, "it failed"));
    }

    #[tokio::test]
    async fn go_style_unary_bytes() {
        let f = fixture();
        let mut s = f.client.session().open().await.expect("open");
        let name = b"/test.Svc/Echo";
        let mut req = Vec::new();
        // Invoke `03 01 01 <len>` + name, Message `05 01 02 <len>` + body, CloseSend `0d 01 03 00`.
        req.extend_from_slice(&[0x03, 0x01, 0x01, name.len() as u8]);
        req.extend_from_slice(name);
        req.extend_from_slice(&[0x05, 0x01, 0x02, 0x03, b'a', b'b', b'c']);
        req.extend_from_slice(&[0x0d, 0x01, 0x03, 0x00]);
        assert_eq!(req, {
            let mut v = packet(1, 1, Kind::Invoke, name);
            v.extend(packet(1, 2, Kind::Message, b"abc"));
            v.extend(packet(1, 3, Kind::CloseSend, b""));
            v
        });
        s.write_all(&req).await.expect("write");
        // Read the reply: Message (1,1) then CloseSend (1,2); then we close like Go does.
        let mut reply = vec![0u8; 7 + 4];
        timeout(T, s.read_exact(&mut reply))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(
            reply,
            [0x05, 0x01, 0x01, 0x03, b'a', b'b', b'c', 0x0d, 0x01, 0x02, 0x00]
        );
        s.shutdown().await.expect("fin");
        let mut rest = Vec::new();
        timeout(T, s.read_to_end(&mut rest))
            .await
            .expect("server closes too")
            .expect("read");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn go_style_stream_derp_maps_request_bytes_and_unknown_reply() {
        // §3.3.8: the StreamDERPMaps request, sent to a server that does not know the method.
        let f = fixture();
        let mut s = f.client.session().open().await.expect("open");
        let mut req = vec![0x03, 0x01, 0x01, 0x28];
        req.extend_from_slice(b"/coder.tailnet.v2.Tailnet/StreamDERPMaps");
        req.extend_from_slice(&[0x05, 0x01, 0x02, 0x00]);
        req.extend_from_slice(&[0x0d, 0x01, 0x03, 0x00]);
        s.write_all(&req).await.expect("write");
        let text = b"protocol error: unknown rpc: \"/coder.tailnet.v2.Tailnet/StreamDERPMaps\"";
        let mut want = vec![0x07, 0x01, 0x01, (8 + text.len()) as u8];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 12]);
        want.extend_from_slice(text);
        let mut got = vec![0u8; want.len()];
        timeout(T, s.read_exact(&mut got))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn server_stream_close_bytes() {
        let f = fixture();
        let mut s = f.client.session().open().await.expect("open");
        let mut req = packet(1, 1, Kind::Invoke, b"/test.Svc/Count");
        req.extend(packet(1, 2, Kind::Message, &[2]));
        req.extend(packet(1, 3, Kind::CloseSend, b""));
        s.write_all(&req).await.expect("write");
        let frames = read_frames(&mut s, 3).await;
        let summary: Vec<(u8, u64, u64, Vec<u8>)> = frames
            .iter()
            .map(|f| (f.control_byte(), f.stream_id, f.message_id, f.data.to_vec()))
            .collect();
        // Two messages then Close (`0b`), numbered from 1 on the client's stream id.
        assert_eq!(
            summary,
            vec![
                (0x05, 1, 1, vec![0]),
                (0x05, 1, 2, vec![1]),
                (0x0b, 1, 3, vec![]),
            ]
        );
    }

    #[tokio::test]
    async fn invoke_metadata_is_tolerated() {
        let f = fixture();
        let mut s = f.client.session().open().await.expect("open");
        let meta = encode_metadata([("k", "v1")]);
        let mut req = packet(1, 1, Kind::InvokeMetadata, &meta);
        req.extend(packet(1, 2, Kind::Invoke, b"/test.Svc/Meta"));
        req.extend(packet(1, 3, Kind::CloseSend, b""));
        s.write_all(&req).await.expect("write");
        let frames = read_frames(&mut s, 2).await;
        assert_eq!(frames[0].kind, Kind::Message);
        assert_eq!(&frames[0].data[..], b"v1");
    }

    #[tokio::test]
    async fn sequential_invokes_on_one_transport() {
        let f = fixture();
        let mut s = f.client.session().open().await.expect("open");
        let mut req = packet(1, 1, Kind::Invoke, b"/test.Svc/Echo");
        req.extend(packet(1, 2, Kind::Message, b"one"));
        req.extend(packet(1, 3, Kind::CloseSend, b""));
        s.write_all(&req).await.expect("write");
        let mut first = vec![0u8; 7 + 4];
        timeout(T, s.read_exact(&mut first))
            .await
            .expect("in time")
            .expect("read");
        let mut req = packet(2, 1, Kind::Invoke, b"/test.Svc/Echo");
        req.extend(packet(2, 2, Kind::Message, b"two"));
        req.extend(packet(2, 3, Kind::CloseSend, b""));
        s.write_all(&req).await.expect("write");
        let frames = read_frames(&mut s, 2).await;
        assert_eq!(
            (
                frames[0].stream_id,
                frames[0].message_id,
                &frames[0].data[..]
            ),
            (2, 1, &b"two"[..])
        );
        assert_eq!(frames[1].kind, Kind::CloseSend);
    }

    #[tokio::test]
    async fn new_invoke_cancels_current_call() {
        let f = fixture();
        let mut s = f.client.session().open().await.expect("open");
        let mut req = packet(1, 1, Kind::Invoke, b"/test.Svc/Hang");
        req.extend(packet(1, 2, Kind::Message, b"x"));
        s.write_all(&req).await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!f.handler.hang_dropped.load(Ordering::SeqCst));
        let mut req = packet(3, 1, Kind::Invoke, b"/test.Svc/Echo");
        req.extend(packet(3, 2, Kind::Message, b"z"));
        s.write_all(&req).await.expect("write");
        let mut reply = vec![0u8; 5];
        timeout(T, s.read_exact(&mut reply))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(reply, [0x05, 0x03, 0x01, 0x01, b'z']);
        assert!(f.handler.hang_dropped.load(Ordering::SeqCst));
    }

    /// Sends `bad` on one transport, expects that transport to be reset, and checks that a second
    /// call on the same session still works.
    async fn bad_transport_then_good_call(f: &Fixture, bad: Vec<u8>) {
        let mut s = f.client.session().open().await.expect("open");
        s.write_all(&bad).await.expect("write");
        let mut buf = Vec::new();
        let r = timeout(T, s.read_to_end(&mut buf)).await.expect("in time");
        let err = r.expect_err("transport reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        assert!(buf.is_empty(), "no reply on a broken transport");
        let req = prost_types::Duration {
            seconds: 1,
            nanos: 2,
        };
        let resp: prost_types::Duration = timeout(T, f.client.invoke_unary("/test.Svc/Echo", &req))
            .await
            .expect("in time")
            .expect("other streams keep working");
        assert_eq!(resp, req);
        assert!(f.metrics.drpc_protocol_errors.get() >= 1);
    }

    #[tokio::test]
    async fn oversized_packet_closes_only_that_transport() {
        let f = fixture();
        // Open a bidi call, then send a Message packet of 4 MiB + 1 in 64 KiB frames.
        let mut bad = packet(1, 1, Kind::Invoke, b"/test.Svc/Bidi");
        bad.extend(packet(1, 2, Kind::Message, &vec![0u8; (4 << 20) + 1]));
        bad_transport_then_good_call(&f, bad).await;
    }

    #[tokio::test]
    async fn oversized_frame_header_closes_only_that_transport() {
        let f = fixture();
        // One frame announcing 5 MiB of data: rejected from the header alone.
        let mut bad = packet(1, 1, Kind::Invoke, b"/test.Svc/Bidi");
        bad.extend_from_slice(&[0x05, 0x01, 0x02, 0x80, 0x80, 0xc0, 0x02]);
        bad_transport_then_good_call(&f, bad).await;
    }

    #[tokio::test]
    async fn id_going_backwards_closes_only_that_transport() {
        let f = fixture();
        let mut bad = packet(1, 1, Kind::Invoke, b"/test.Svc/Bidi");
        bad.extend(packet(1, 2, Kind::Message, b"a"));
        bad.extend(packet(1, 1, Kind::Message, b"b"));
        bad_transport_then_good_call(&f, bad).await;
    }

    #[tokio::test]
    async fn malformed_varint_closes_only_that_transport() {
        let f = fixture();
        let mut bad = packet(1, 1, Kind::Invoke, b"/test.Svc/Bidi");
        bad.extend_from_slice(&[
            0x05, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ]);
        bad_transport_then_good_call(&f, bad).await;
    }

    #[tokio::test]
    async fn unknown_non_control_kind_closes_only_that_transport() {
        let f = fixture();
        let mut bad = packet(1, 1, Kind::Invoke, b"/test.Svc/Bidi");
        bad.extend(packet(1, 2, Kind::Unknown(20), b""));
        bad_transport_then_good_call(&f, bad).await;
    }

    #[tokio::test]
    async fn unknown_control_kind_is_ignored() {
        let f = fixture();
        let mut s = f.client.session().open().await.expect("open");
        let mut req = packet(1, 1, Kind::Invoke, b"/test.Svc/Echo");
        // Kind 20 with the control bit: ignored.
        let mut ctl = BytesMut::new();
        proto::drpc::encode_packet_with(1, 2, Kind::Unknown(20), true, b"", &mut ctl);
        req.extend_from_slice(&ctl);
        req.extend(packet(1, 3, Kind::Message, b"q"));
        req.extend(packet(1, 4, Kind::CloseSend, b""));
        s.write_all(&req).await.expect("write");
        let frames = read_frames(&mut s, 2).await;
        assert_eq!(&frames[0].data[..], b"q");
    }

    #[tokio::test]
    async fn take_over_gets_raw_bytes() {
        let f = fixture();
        let mut s = f.client.session().open().await.expect("open");
        let mut req = packet(1, 1, Kind::Invoke, b"/proxy.Svc/Forward");
        req.extend(packet(1, 2, Kind::Message, b"payload"));
        s.write_all(&req).await.expect("write");
        let mut got = Vec::new();
        timeout(T, s.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(got, b"taken");
        let taken = f.handler.taken.lock().expect("lock").clone();
        let (method, consumed) = taken.expect("taken over");
        assert_eq!(method, "/proxy.Svc/Forward");
        // Everything read so far, verbatim: at least the Invoke, at most what we sent.
        assert!(req.starts_with(&consumed));
        assert!(consumed.len() >= packet(1, 1, Kind::Invoke, b"/proxy.Svc/Forward").len());
    }

    #[tokio::test]
    async fn dropping_client_stream_ends_handler() {
        let f = fixture();
        let s = f.client.open_stream("/test.Svc/Hang").await.expect("open");
        s.send(Bytes::from_static(b"x")).await.expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
        for _ in 0..200 {
            if f.handler.hang_dropped.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("handler future not dropped after the client closed the transport");
    }
}
