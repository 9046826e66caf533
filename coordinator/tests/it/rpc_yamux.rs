//! yamux session tests: our server and client against each other over in-memory pipes, and our
//! server against a hand-driven "raw" peer that writes exact hashicorp frames.

/// Wrapped in a module named after the layer so that `cargo test -p coordinator rpc` runs it.
mod rpc {

    use std::time::Duration;

    use coordinator::rpc::yamux::{Config, Session, SessionError};
    use coordinator::rpc::RpcMetrics;
    use proto::yamux::{Flags, Header, Type, GO_AWAY_PROTOCOL_ERROR, HEADER_LEN, INITIAL_WINDOW};
    use std::sync::Arc;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
    use tokio::time::timeout;

    const T: Duration = Duration::from_secs(20);

    fn pair(server_cfg: Config, client_cfg: Config) -> (Session, Session) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (
            Session::server(a, server_cfg),
            Session::client(b, client_cfg),
        )
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8)
            .collect()
    }

    async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Header {
        let mut b = [0u8; HEADER_LEN];
        r.read_exact(&mut b).await.expect("read header");
        Header::decode(&b).expect("valid").expect("complete")
    }

    /// Reads frames until one matches `pred`, skipping (and consuming the payload of) others.
    async fn read_until<R: AsyncRead + Unpin>(r: &mut R, pred: impl Fn(&Header) -> bool) -> Header {
        loop {
            let h = read_header(r).await;
            if h.typ == Type::Data && h.length > 0 {
                let mut skip = vec![0u8; h.length as usize];
                r.read_exact(&mut skip).await.expect("payload");
            }
            if pred(&h) {
                return h;
            }
        }
    }

    async fn write_header<W: AsyncWrite + Unpin>(w: &mut W, h: Header) {
        w.write_all(&h.encode()).await.expect("write header");
    }

    /// The raw peer sends "hello" with FIN on stream 1; `s` reads exactly that, then EOF.
    async fn fin_with_hello_arrives(
        raw: &mut DuplexStream,
        s: &mut coordinator::rpc::yamux::Stream,
    ) {
        write_header(raw, Header::data(Flags::FIN, 1, 5)).await;
        raw.write_all(b"hello").await.expect("payload");
        let mut got = Vec::new();
        timeout(T, s.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(got, b"hello");
    }

    fn raw_server(cfg: Config) -> (Session, DuplexStream) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (Session::server(a, cfg), b)
    }

    #[tokio::test]
    async fn many_streams_echo() {
        let (mut server, client) = pair(Config::default(), Config::default());
        let srv = tokio::spawn(async move {
            let mut tasks = Vec::new();
            for _ in 0..50 {
                let mut s = server.accept().await.expect("accept");
                tasks.push(tokio::spawn(async move {
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.expect("read");
                    s.write_all(&buf).await.expect("write");
                    s.shutdown().await.expect("fin");
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
            server
        });
        let mut tasks = Vec::new();
        for i in 0..50u8 {
            let mut s = client.open().await.expect("open");
            assert_eq!(s.id() % 2, 1, "client streams are odd");
            tasks.push(tokio::spawn(async move {
                let data = pattern(i, 1000 + i as usize * 97);
                s.write_all(&data).await.expect("write");
                s.shutdown().await.expect("fin");
                let mut back = Vec::new();
                s.read_to_end(&mut back).await.expect("read");
                assert_eq!(back, data);
            }));
        }
        for t in tasks {
            timeout(T, t).await.expect("in time").expect("task");
        }
        let _server = timeout(T, srv).await.expect("in time").expect("server");
    }

    #[tokio::test]
    async fn five_mib_each_way_respects_windows() {
        let (mut server, client) = pair(Config::default(), Config::default());
        const N: usize = 5 << 20;
        let srv = tokio::spawn(async move {
            let s = server.accept().await.expect("accept");
            let (mut rd, mut wr) = s.into_split();
            let w = tokio::spawn(async move {
                wr.write_all(&pattern(7, N)).await.expect("write");
                wr.shutdown().await.expect("fin");
                wr
            });
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.expect("read");
            assert!(got == pattern(3, N), "server received corrupted data");
            let _wr = w.await.expect("writer");
            server
        });
        let s = client.open().await.expect("open");
        let (mut rd, mut wr) = s.into_split();
        let w = tokio::spawn(async move {
            wr.write_all(&pattern(3, N)).await.expect("write");
            wr.shutdown().await.expect("fin");
            wr
        });
        let mut got = Vec::new();
        timeout(T, rd.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("read");
        assert!(got == pattern(7, N), "client received corrupted data");
        let _wr = timeout(T, w).await.expect("in time").expect("writer");
        let _server = timeout(T, srv).await.expect("in time").expect("server");
    }

    #[tokio::test]
    async fn slow_reader_backpressure_buffers_at_most_the_window() {
        // The server never reads: the client must stall after one window instead of buffering.
        let (mut server, client) = pair(Config::default(), Config::default());
        let held = tokio::spawn(async move {
            let s = server.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(s);
            server
        });
        let mut s = client.open().await.expect("open");
        let big = vec![1u8; 2 * INITIAL_WINDOW as usize];
        let res = timeout(Duration::from_millis(500), s.write_all(&big)).await;
        assert!(
            res.is_err(),
            "write must block once the peer's window is used up"
        );
        held.abort();
    }

    #[tokio::test]
    async fn half_close_then_reply() {
        let (mut server, client) = pair(Config::default(), Config::default());
        let srv = tokio::spawn(async move {
            let mut s = server.accept().await.expect("accept");
            let mut req = Vec::new();
            s.read_to_end(&mut req).await.expect("read to FIN");
            assert_eq!(req, b"question");
            s.write_all(b"answer").await.expect("write after peer FIN");
            s.shutdown().await.expect("fin");
            server
        });
        let mut s = client.open().await.expect("open");
        s.write_all(b"question").await.expect("write");
        s.shutdown().await.expect("fin");
        assert!(s.write_all(b"x").await.is_err(), "no writes after our FIN");
        let mut resp = Vec::new();
        timeout(T, s.read_to_end(&mut resp))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(resp, b"answer");
        let _server = srv.await.expect("server");
    }

    #[tokio::test]
    async fn reset_fails_both_directions() {
        let (mut server, client) = pair(Config::default(), Config::default());
        let s = client.open().await.expect("open");
        let mut s2 = client.open().await.expect("open second");
        let mut a = timeout(T, server.accept())
            .await
            .expect("in time")
            .expect("accept");
        let mut b = timeout(T, server.accept())
            .await
            .expect("in time")
            .expect("accept");
        s.reset().await.expect("rst");
        let mut buf = [0u8; 8];
        let err = timeout(T, a.read(&mut buf))
            .await
            .expect("in time")
            .expect_err("reset stream read fails");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        assert!(a.write_all(b"x").await.is_err());
        // The other stream is unaffected.
        s2.write_all(b"ok").await.expect("write");
        b.read_exact(&mut buf[..2]).await.expect("read");
        assert_eq!(&buf[..2], b"ok");
    }

    #[tokio::test]
    async fn ping_round_trip() {
        let (server, client) = pair(Config::default(), Config::default());
        timeout(T, client.ping())
            .await
            .expect("in time")
            .expect("client ping");
        timeout(T, server.ping())
            .await
            .expect("in time")
            .expect("server ping");
    }

    #[tokio::test]
    async fn answers_raw_ping_with_same_opaque() {
        let (_server, mut raw) = raw_server(Config::default());
        write_header(&mut raw, Header::ping(Flags::SYN, 0xdead_beef)).await;
        let h = timeout(T, read_until(&mut raw, |h| h.typ == Type::Ping))
            .await
            .expect("in time");
        assert_eq!(h.flags, Flags::ACK);
        assert_eq!(h.stream_id, 0);
        assert_eq!(h.length, 0xdead_beef);
    }

    #[tokio::test]
    async fn keepalive_timeout_kills_silent_peer() {
        let metrics = Arc::new(RpcMetrics::new().expect("metrics"));
        let cfg = Config {
            keepalive_interval: Duration::from_millis(100),
            connection_write_timeout: Duration::from_millis(200),
            metrics: Some(metrics.clone()),
            ..Config::default()
        };
        let (server, mut raw) = raw_server(cfg);
        // The raw peer sees our keepalive pings but never answers them.
        let ping = timeout(T, read_until(&mut raw, |h| h.typ == Type::Ping))
            .await
            .expect("in time");
        assert_eq!(ping.flags, Flags::SYN);
        let end = timeout(T, server.closed()).await.expect("session ends");
        assert_eq!(end, SessionError::KeepAliveTimeout);
        assert_eq!(metrics.yamux_keepalive_timeouts.get(), 1);
    }

    #[tokio::test]
    async fn keepalive_answered_keeps_session() {
        let cfg = Config {
            keepalive_interval: Duration::from_millis(50),
            connection_write_timeout: Duration::from_millis(500),
            ..Config::default()
        };
        let (server, client) = pair(cfg.clone(), cfg);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!server.handle().is_closed());
        assert!(!client.handle().is_closed());
    }

    async fn expect_protocol_goaway(server: &Session, raw: &mut DuplexStream) {
        let h = timeout(T, read_until(raw, |h| h.typ == Type::GoAway))
            .await
            .expect("go away in time");
        assert_eq!(h.length, GO_AWAY_PROTOCOL_ERROR);
        let end = timeout(T, server.closed()).await.expect("session ends");
        assert!(matches!(end, SessionError::Protocol(_)), "{end:?}");
    }

    #[tokio::test]
    async fn bad_version_gets_protocol_goaway() {
        let metrics = Arc::new(RpcMetrics::new().expect("metrics"));
        let (server, mut raw) = raw_server(Config {
            metrics: Some(metrics.clone()),
            ..Config::default()
        });
        let mut h = Header::ping(Flags::SYN, 1).encode();
        h[0] = 1;
        raw.write_all(&h).await.expect("write");
        expect_protocol_goaway(&server, &mut raw).await;
        assert_eq!(metrics.yamux_protocol_errors.get(), 1);
    }

    #[tokio::test]
    async fn bad_type_gets_protocol_goaway() {
        let (server, mut raw) = raw_server(Config::default());
        let mut h = Header::ping(Flags::SYN, 1).encode();
        h[1] = 9;
        raw.write_all(&h).await.expect("write");
        expect_protocol_goaway(&server, &mut raw).await;
    }

    #[tokio::test]
    async fn window_violation_gets_protocol_goaway() {
        let (mut server, mut raw) = raw_server(Config::default());
        write_header(&mut raw, Header::window_update(Flags::SYN, 1, 0)).await;
        let _s = timeout(T, server.accept())
            .await
            .expect("in time")
            .expect("accept");
        // Fill the window exactly (allowed), then one byte more (not allowed; nobody reads).
        let chunk = vec![0u8; INITIAL_WINDOW as usize];
        write_header(&mut raw, Header::data(Flags::NONE, 1, INITIAL_WINDOW)).await;
        raw.write_all(&chunk).await.expect("payload");
        write_header(&mut raw, Header::data(Flags::NONE, 1, 1)).await;
        raw.write_all(&[0]).await.expect("payload");
        expect_protocol_goaway(&server, &mut raw).await;
    }

    #[tokio::test]
    async fn syn_is_acked_before_accept() {
        let (mut server, mut raw) = raw_server(Config::default());
        write_header(&mut raw, Header::window_update(Flags::SYN, 1, 0)).await;
        // Nobody has called accept yet: the ACK must still come.
        let h = timeout(T, read_until(&mut raw, |h| h.typ == Type::WindowUpdate))
            .await
            .expect("ack in time");
        assert_eq!(h.stream_id, 1);
        assert!(h.flags.contains(Flags::ACK));
        assert_eq!(h.length, 0, "default window: delta 0");
        let mut s = server.accept().await.expect("accept");
        // Data then FIN from the raw client arrives in order.
        fin_with_hello_arrives(&mut raw, &mut s).await;
        // Our reply: data frame then FIN on stream 1.
        s.write_all(b"hi").await.expect("write");
        s.shutdown().await.expect("fin");
        let d = read_header(&mut raw).await;
        assert_eq!((d.typ, d.stream_id, d.length), (Type::Data, 1, 2));
        let mut p = [0u8; 2];
        raw.read_exact(&mut p).await.expect("payload");
        assert_eq!(&p, b"hi");
        let f = read_until(&mut raw, |h| h.stream_id == 1).await;
        assert!(f.flags.contains(Flags::FIN));
    }

    /// A data frame for a stream the server does not know is skipped, payload and all, through
    /// the reader's own buffer (many times its size here), and the frames after it are read
    /// exactly where they start.
    #[tokio::test]
    async fn data_for_an_unknown_stream_is_skipped_exactly() {
        let (mut server, mut raw) = raw_server(Config::default());
        write_header(&mut raw, Header::window_update(Flags::SYN, 1, 0)).await;
        let mut s = timeout(T, server.accept())
            .await
            .expect("in time")
            .expect("accept");
        let junk = pattern(7, 100 * 1024 + 3);
        write_header(&mut raw, Header::data(Flags::NONE, 5, junk.len() as u32)).await;
        raw.write_all(&junk).await.expect("payload");
        fin_with_hello_arrives(&mut raw, &mut s).await;
    }

    #[tokio::test]
    async fn even_stream_from_client_is_protocol_error() {
        let (server, mut raw) = raw_server(Config::default());
        write_header(&mut raw, Header::window_update(Flags::SYN, 2, 0)).await;
        expect_protocol_goaway(&server, &mut raw).await;
    }

    #[tokio::test]
    async fn backlog_full_gets_rst() {
        let metrics = Arc::new(RpcMetrics::new().expect("metrics"));
        let (_server, mut raw) = raw_server(Config {
            accept_backlog: 1,
            metrics: Some(metrics.clone()),
            ..Config::default()
        });
        write_header(&mut raw, Header::window_update(Flags::SYN, 1, 0)).await;
        write_header(&mut raw, Header::window_update(Flags::SYN, 3, 0)).await;
        let h = timeout(
            T,
            read_until(&mut raw, |h| {
                h.stream_id == 3 && h.flags.contains(Flags::RST)
            }),
        )
        .await
        .expect("rst in time");
        assert_eq!(h.typ, Type::WindowUpdate);
        assert_eq!(metrics.yamux_streams_rejected.get(), 1);
    }

    #[tokio::test]
    async fn unacked_open_times_out_session() {
        let (a, mut raw) = tokio::io::duplex(1 << 20);
        let client = Session::client(
            a,
            Config {
                stream_open_timeout: Duration::from_millis(200),
                enable_keepalive: false,
                ..Config::default()
            },
        );
        let _s = client.open().await.expect("open");
        let syn = timeout(T, read_header(&mut raw)).await.expect("syn");
        assert_eq!(
            (syn.typ, syn.flags, syn.stream_id, syn.length),
            (Type::WindowUpdate, Flags::SYN, 1, 0),
            "hashicorp open: WindowUpdate SYN delta 0"
        );
        let end = timeout(T, client.closed()).await.expect("ends");
        assert_eq!(end, SessionError::StreamOpenTimeout);
    }

    /// The writer's queue of stream frames holds at most `write_queue_depth`: with the transport
    /// stalled, writes stop completing once it is full (a stream waits, nothing piles up), and
    /// every waiting write completes, in order, once the transport drains.
    #[tokio::test]
    async fn stream_writes_wait_for_room_in_the_write_queue() {
        const DEPTH: usize = 2;
        // A 64-byte pipe the raw peer does not read yet: the writer's first batch blocks.
        let (a, mut raw) = tokio::io::duplex(64);
        let client = Session::client(
            a,
            Config {
                write_queue_depth: DEPTH,
                enable_keepalive: false,
                ..Config::default()
            },
        );
        let mut s = client.open().await.expect("open");
        let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = written.clone();
        const WRITES: usize = 200;
        let writer = tokio::spawn(async move {
            for i in 0..WRITES {
                s.write_all(&[i as u8]).await.expect("write");
                w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            s
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stalled = written.load(std::sync::atomic::Ordering::SeqCst);
        // What the pipe took (64 bytes: at most 5 frames of 13 bytes), the writer's blocked
        // batch (at most DEPTH frames) and a full queue (DEPTH): nothing more.
        assert!(
            stalled <= 5 + 2 * DEPTH,
            "{stalled} one-byte writes completed with the transport stalled"
        );
        // Drain: the SYN, then every byte in order.
        let syn = timeout(T, read_header(&mut raw)).await.expect("syn");
        assert_eq!(
            (syn.typ, syn.flags, syn.stream_id),
            (Type::WindowUpdate, Flags::SYN, 1)
        );
        let mut got = Vec::new();
        while got.len() < WRITES {
            let h = timeout(T, read_header(&mut raw)).await.expect("frame");
            assert_eq!((h.typ, h.stream_id), (Type::Data, 1));
            let mut body = vec![0u8; h.length as usize];
            raw.read_exact(&mut body).await.expect("payload");
            got.extend_from_slice(&body);
        }
        let expected: Vec<u8> = (0..WRITES).map(|i| i as u8).collect();
        assert_eq!(got, expected);
        timeout(T, writer)
            .await
            .expect("writes finish")
            .expect("task");
        assert_eq!(written.load(std::sync::atomic::Ordering::SeqCst), WRITES);
    }

    /// An opened stream arms the open timer (75 s) and a half-close the close timer (5 min);
    /// neither may outlive its session: once both sessions report closed, no task of theirs runs.
    #[tokio::test(flavor = "current_thread")]
    async fn stream_timers_end_with_their_session() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        let (mut server, client) = pair(Config::default(), Config::default());
        let mut c = client.open().await.expect("open");
        let mut s = timeout(T, server.accept())
            .await
            .expect("in time")
            .expect("accept");
        c.write_all(b"x").await.expect("write");
        c.shutdown().await.expect("client half-close");
        let mut got = [0u8; 1];
        timeout(T, s.read_exact(&mut got))
            .await
            .expect("in time")
            .expect("read");
        s.shutdown().await.expect("server half-close");
        let (server_end, client_end) = (server.handle(), client.handle());
        drop((server, client));
        timeout(T, server_end.closed()).await.expect("server ends");
        timeout(T, client_end.closed()).await.expect("client ends");
        drop((c, s));
        for _ in 0..200 {
            if metrics.num_alive_tasks() == before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{} tasks still alive after both sessions closed",
            metrics.num_alive_tasks() - before
        );
    }

    #[tokio::test]
    async fn blocked_write_times_out_session() {
        let metrics = Arc::new(RpcMetrics::new().expect("metrics"));
        // A tiny pipe the raw peer never reads: our writer blocks.
        let (a, mut raw) = tokio::io::duplex(1024);
        let mut server = Session::server(
            a,
            Config {
                connection_write_timeout: Duration::from_millis(200),
                enable_keepalive: false,
                metrics: Some(metrics.clone()),
                ..Config::default()
            },
        );
        write_header(&mut raw, Header::window_update(Flags::SYN, 1, 0)).await;
        let mut s = timeout(T, server.accept())
            .await
            .expect("in time")
            .expect("accept");
        let _ = timeout(Duration::from_secs(2), s.write_all(&[0u8; 64 * 1024])).await;
        let end = timeout(T, server.closed()).await.expect("ends");
        assert_eq!(end, SessionError::WriteTimeout);
        assert_eq!(metrics.yamux_write_timeouts.get(), 1);
    }

    #[tokio::test]
    async fn remote_eof_ends_session_and_streams() {
        let (mut server, client) = pair(Config::default(), Config::default());
        let _c = client.open().await.expect("open");
        let mut s = timeout(T, server.accept())
            .await
            .expect("in time")
            .expect("accept");
        drop(client);
        let end = timeout(T, server.closed()).await.expect("ends");
        assert!(
            matches!(end, SessionError::Eof | SessionError::RemoteGoAwayNormal),
            "{end:?}"
        );
        let mut buf = [0u8; 1];
        let r = timeout(T, s.read(&mut buf)).await.expect("in time");
        assert!(matches!(r, Ok(0) | Err(_)));
        assert!(server.accept().await.is_err());
    }

    #[tokio::test]
    async fn go_away_normal_refuses_new_streams() {
        let (server, client) = pair(Config::default(), Config::default());
        server.handle().go_away().await.expect("go away");
        // Give the frame time to arrive.
        for _ in 0..100 {
            match client.open().await {
                Err(SessionError::RemoteGoAwayNormal) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        panic!("client kept opening streams after GoAway");
    }
}
