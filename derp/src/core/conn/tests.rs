//! Buffer life cycle, driven by hand: the task is polled directly (no runtime task) so the
//! test can look at its buffers between polls.
use proto::derp::{
    FrameHeader, PeerPresentFlags, FRAME_HEADER_LEN, KEY_LEN, MAX_PACKET_SIZE, PING_LEN,
};
use proto::key::{NodePrivate, NodePublic};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::idle::IDLE_RELEASE;
use super::read::{IDLE_READ, READ_CHUNK};
use super::*;
use crate::core::queue::SendQueue;

/// A registry with one registered connection handle, for a task driven by hand.
struct Rig {
    registry: Registry,
    metrics: Arc<Metrics>,
    rate: crate::core::rate::RateLimits,
    h: Arc<ConnHandle>,
}

/// The rig plus both ends of the connection's pipe: the client's and the task's.
fn rig() -> (Rig, DuplexStream, DuplexStream) {
    rig_with(Duration::ZERO, false)
}

/// [`rig`] for a connection established `connected_ago` ago, whose client said this relay is
/// not its ideal node if `not_ideal`.
fn rig_with(connected_ago: Duration, not_ideal: bool) -> (Rig, DuplexStream, DuplexStream) {
    let metrics = Arc::new(Metrics::new(&prometheus::Registry::new()).unwrap());
    let server_key = NodePrivate::generate(&mut rand::rngs::OsRng).public();
    let registry = Registry::new(metrics.clone(), server_key, [1, 2]);
    let me = NodePrivate::generate(&mut rand::rngs::OsRng).public();
    let mut h = ConnHandle::new(
        1,
        me,
        SendQueue::new(64, 16),
        "127.0.0.1:1".parse().unwrap(),
        PeerPresentFlags::default(),
        not_ideal,
    );
    h.connected_at = std::time::Instant::now()
        .checked_sub(connected_ago)
        .unwrap();
    let h = Arc::new(h);
    registry.register(&h);
    let (client, server_io) = tokio::io::duplex(1 << 20);
    (
        Rig {
            registry,
            metrics,
            rate: Default::default(),
            h,
        },
        client,
        server_io,
    )
}

impl Rig {
    /// A task on `io` (holding no buffer yet) and its timer, armed for the first keepalive.
    fn task(&self, io: DuplexStream) -> (ConnTask<'_, DuplexStream>, Pin<Box<Sleep>>) {
        let task = ConnTask::new(
            &self.registry,
            &self.metrics,
            &self.rate,
            self.h.clone(),
            io,
            BytesMut::new(),
            params(),
        );
        let sleep = Box::pin(tokio::time::sleep_until(task.next_keepalive));
        (task, sleep)
    }
}

fn params() -> ConnParams {
    ConnParams {
        mesh: false,
        write_timeout: Duration::from_secs(10),
        keepalive: Duration::from_secs(600),
        keepalive_jitter: Duration::ZERO,
    }
}

/// Polls the task once; panics if it ended.
async fn poll(task: &mut ConnTask<'_, DuplexStream>, sleep: Pin<&mut Sleep>) {
    let mut sleep = sleep;
    let r = std::future::poll_fn(|cx| Poll::Ready(task.poll_once(cx, sleep.as_mut()))).await;
    if let Poll::Ready(c) = r {
        panic!("connection ended: {c}");
    }
}

/// Polls until `want` bytes came back to the client (bounded).
async fn poll_until_read(
    task: &mut ConnTask<'_, DuplexStream>,
    mut sleep: Pin<&mut Sleep>,
    client: &mut DuplexStream,
    want: usize,
) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 17];
    for _ in 0..10_000 {
        poll(task, sleep.as_mut()).await;
        if got.len() >= want {
            return got;
        }
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), client.read(&mut buf)).await
        {
            assert!(n > 0, "server closed");
            got.extend_from_slice(&buf[..n]);
        }
    }
    panic!("only {} of {want} bytes came back", got.len());
}

fn send_packet_frame(dst: &NodePublic, payload: &[u8]) -> Vec<u8> {
    let mut f = FrameHeader::new(FrameType::SendPacket, (KEY_LEN + payload.len()) as u32)
        .encode()
        .to_vec();
    f.extend_from_slice(dst.as_bytes());
    f.extend_from_slice(payload);
    f
}

fn recv_packet_frame(src: &NodePublic, payload: &[u8]) -> Vec<u8> {
    let mut f = send_packet_frame(src, payload);
    f[0] = FrameType::RecvPacket.as_u8();
    f
}

/// Polls every 50 ms until the connection holds no buffer; returns how long that took.
async fn wait_released(
    task: &mut ConnTask<'_, DuplexStream>,
    mut sleep: Pin<&mut Sleep>,
) -> Duration {
    let t0 = Instant::now();
    while task.holds_buffers() {
        assert!(
            t0.elapsed() < IDLE_RELEASE * 4,
            "buffers not released: rbuf {} out {} wbuf {}",
            task.rbuf.capacity(),
            task.out.capacity(),
            task.wbuf.capacity()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        poll(task, sleep.as_mut()).await;
    }
    t0.elapsed()
}

#[tokio::test]
async fn small_frames_on_an_idle_connection_leave_no_buffer() {
    let (r, mut client, io) = rig();
    let (mut task, mut sleep) = r.task(io);
    poll(&mut task, sleep.as_mut()).await;
    assert!(!task.holds_buffers());

    // NotePreferred + Ping: handled from a short read, nothing kept but the pong's list.
    let mut f = FrameHeader::new(FrameType::NotePreferred, 1)
        .encode()
        .to_vec();
    f.push(1);
    f.extend_from_slice(&FrameHeader::new(FrameType::Ping, PING_LEN as u32).encode());
    f.extend_from_slice(b"12345678");
    client.write_all(&f).await.unwrap();
    let pong = poll_until_read(&mut task, sleep.as_mut(), &mut client, 13).await;
    assert_eq!(pong[0], FrameType::Pong.as_u8());
    assert_eq!(&pong[FRAME_HEADER_LEN..], b"12345678");
    assert_eq!(
        task.rbuf.capacity(),
        0,
        "a short idle read must not keep a buffer"
    );
    assert!(task.preferred);
    task.finish(&Close::Eof);
}

#[tokio::test]
async fn read_buffer_is_released_when_idle_and_regrows_for_large_frames() {
    let (r, mut client, io) = rig();
    let me = r.h.key;
    let (mut task, mut sleep) = r.task(io);
    poll(&mut task, sleep.as_mut()).await;

    // A burst (to ourselves: every packet comes back as RecvPacket) grows a read chunk.
    let payload: Vec<u8> = (0..1400u32).map(|i| i as u8).collect();
    let mut burst = Vec::new();
    let mut expect = Vec::new();
    for _ in 0..20 {
        burst.extend_from_slice(&send_packet_frame(&me, &payload));
        expect.extend_from_slice(&recv_packet_frame(&me, &payload));
    }
    client.write_all(&burst).await.unwrap();
    let got = poll_until_read(&mut task, sleep.as_mut(), &mut client, expect.len()).await;
    assert_eq!(got, expect);
    assert!(
        task.rbuf.capacity() >= IDLE_READ,
        "a burst reads into a chunk"
    );
    assert!(
        task.release_at.is_some(),
        "holding buffers arms the idle check"
    );

    // Quiet: everything is given back after one to two periods, not before.
    let took = wait_released(&mut task, sleep.as_mut()).await;
    assert!(took >= IDLE_RELEASE / 2, "released too early ({took:?})");
    assert_eq!(task.rbuf.capacity(), 0);
    assert_eq!(task.out.capacity(), 0);
    assert!(task.hist.is_none());
    assert!(task.release_at.is_none());

    // A maximum-size packet after the release, arriving in pieces: the buffer grows again.
    let big: Vec<u8> = (0..MAX_PACKET_SIZE as u32).map(|i| (i * 7) as u8).collect();
    let f = send_packet_frame(&me, &big);
    client.write_all(&f[..300]).await.unwrap();
    poll(&mut task, sleep.as_mut()).await;
    assert_eq!(task.rbuf.len(), 300, "partial frame kept");
    client.write_all(&f[300..]).await.unwrap();
    let want = recv_packet_frame(&me, &big);
    let got = poll_until_read(&mut task, sleep.as_mut(), &mut client, want.len()).await;
    assert_eq!(got.len(), want.len());
    assert!(got == want, "large packet corrupted after re-growth");
    wait_released(&mut task, sleep.as_mut()).await;

    // The same in one piece (a full stack read starts a chunk that then grows).
    client.write_all(&f).await.unwrap();
    let got = poll_until_read(&mut task, sleep.as_mut(), &mut client, want.len()).await;
    assert!(got == want, "large packet corrupted");
    task.finish(&Close::Eof);
}

#[tokio::test]
async fn partial_frame_of_a_quiet_client_is_kept_compactly() {
    let (r, mut client, io) = rig();
    let me = r.h.key;
    let (mut task, mut sleep) = r.task(io);
    let f = send_packet_frame(&me, &vec![9u8; 8000]);
    // More than a stack read: a chunk is allocated, then the client stalls mid-frame.
    client.write_all(&f[..4000]).await.unwrap();
    for _ in 0..20 {
        poll(&mut task, sleep.as_mut()).await;
        tokio::task::yield_now().await;
    }
    assert_eq!(task.rbuf.len(), 4000);
    assert!(task.rbuf.capacity() >= READ_CHUNK);
    let t0 = Instant::now();
    while task.rbuf.capacity() > 4000 {
        assert!(
            t0.elapsed() < IDLE_RELEASE * 4,
            "partial frame never compacted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        poll(&mut task, sleep.as_mut()).await;
    }
    assert_eq!(task.rbuf.len(), 4000);
    client.write_all(&f[4000..]).await.unwrap();
    let want = recv_packet_frame(&me, &vec![9u8; 8000]);
    let got = poll_until_read(&mut task, sleep.as_mut(), &mut client, want.len()).await;
    assert!(got == want);
    task.finish(&Close::Eof);
}

#[tokio::test]
async fn oversized_frame_after_release_ends_the_connection() {
    let (r, mut client, io) = rig();
    let (mut task, mut sleep) = r.task(io);
    poll(&mut task, sleep.as_mut()).await;
    // A SendPacket header claiming 2 MiB, from a connection holding no buffer.
    let hdr = FrameHeader::new(FrameType::SendPacket, 2 << 20).encode();
    client.write_all(&hdr).await.unwrap();
    let why = std::future::poll_fn(|cx| task.poll_once(cx, sleep.as_mut())).await;
    assert!(matches!(why, Close::Protocol(_)), "{why}");
    assert!(
        task.rbuf.capacity() < IDLE_READ,
        "nothing big was allocated"
    );
    task.finish(&why);
}

/// NotePreferred(`preferred`) then a Ping, polled until the Pong is back (so the frame was
/// handled).
async fn note_preferred(
    task: &mut ConnTask<'_, DuplexStream>,
    sleep: Pin<&mut Sleep>,
    client: &mut DuplexStream,
    preferred: bool,
) {
    let mut f = FrameHeader::new(FrameType::NotePreferred, 1)
        .encode()
        .to_vec();
    f.push(u8::from(preferred));
    f.extend_from_slice(&FrameHeader::new(FrameType::Ping, PING_LEN as u32).encode());
    f.extend_from_slice(b"12345678");
    client.write_all(&f).await.unwrap();
    let pong = poll_until_read(task, sleep, client, 13).await;
    assert_eq!(pong[0], FrameType::Pong.as_u8());
}

#[tokio::test]
async fn home_moves_count_only_after_the_first_seconds_like_derper() {
    // A fresh connection announcing its home: not a move.
    let (r, mut client, io) = rig();
    let (mut task, mut sleep) = r.task(io);
    note_preferred(&mut task, sleep.as_mut(), &mut client, true).await;
    assert_eq!(r.metrics.current_home_connections.get(), 1);
    assert!(r.h.preferred.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(r.metrics.home_moves_in.get(), 0);
    task.finish(&Close::Eof);
    assert_eq!(r.metrics.current_home_connections.get(), 0);

    // An established connection (past HOME_MOVE_SETTLE) moving in, out, and a repeat that
    // changes nothing.
    let settled = crate::core::metrics::HOME_MOVE_SETTLE + Duration::from_secs(1);
    let (r, mut client, io) = rig_with(settled, false);
    let (mut task, mut sleep) = r.task(io);
    note_preferred(&mut task, sleep.as_mut(), &mut client, true).await;
    note_preferred(&mut task, sleep.as_mut(), &mut client, true).await;
    assert_eq!(r.metrics.home_moves_in.get(), 1);
    assert_eq!(r.metrics.current_home_connections.get(), 1);
    note_preferred(&mut task, sleep.as_mut(), &mut client, false).await;
    assert_eq!(r.metrics.home_moves_out.get(), 1);
    assert_eq!(r.metrics.current_home_connections.get(), 0);
    assert!(!r.h.preferred.load(std::sync::atomic::Ordering::Relaxed));
    task.finish(&Close::Eof);
    assert_eq!(
        (
            r.metrics.home_moves_in.get(),
            r.metrics.home_moves_out.get()
        ),
        (1, 1),
        "a disconnect is not a move"
    );
}

#[tokio::test]
async fn not_ideal_connections_are_counted_while_registered() {
    let (r, _client, io) = rig_with(Duration::ZERO, true);
    assert_eq!(r.metrics.current_notideal_connections.get(), 1);
    let (mut task, _sleep) = r.task(io);
    task.finish(&Close::Eof);
    assert_eq!(r.metrics.current_notideal_connections.get(), 0);
    let (r, _client, _io) = rig();
    assert_eq!(r.metrics.current_notideal_connections.get(), 0);
}
