//! DERP wire-format and forward-path microbenchmarks: frame header decode/encode, typed
//! `Frame` decode/encode, the in-place SendPacket→RecvPacket and ForwardPacket→RecvPacket
//! rewrites (the very functions the relay's connection task runs on every relayed packet), a
//! registry lookup through `Server`'s public API, and one in-process relay round (two clients
//! over in-memory pipes).
//!
//! Kept short (small sample sizes, ~1 s measurement) so `cargo bench` finishes in minutes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use derp::{Client, ClientOptions, ConnInfo, ReceivedFrame, Server, ServerConfig};
use proto::derp::{
    encode_send_packet, forward_packet_prefix, rewrite_forward_to_recv, rewrite_send_to_recv,
    Frame, FrameHeader, FrameType, FRAME_HEADER_LEN,
};
use proto::key::{NodePrivate, NodePublic};

fn key(i: u8) -> NodePublic {
    let mut b = [0u8; 32];
    b[0] = i;
    b[31] = 0xa5;
    NodePublic::from_bytes(b)
}

fn send_packet_frame(len: usize) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_send_packet(&mut buf, &key(2), &vec![0x42u8; len]);
    buf
}

fn quick(c: &mut Criterion) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group("derp");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g
}

fn header(c: &mut Criterion) {
    let mut g = quick(c);
    let h = FrameHeader::new(FrameType::SendPacket, 1432);
    let wire = h.encode();
    g.bench_function("header_decode", |b| {
        b.iter(|| FrameHeader::decode(black_box(&wire[..])))
    });
    g.bench_function("header_encode", |b| b.iter(|| black_box(h).encode()));
    g.finish();
}

fn frames(c: &mut Criterion) {
    let mut g = quick(c);
    for size in [100usize, 1400, 8000] {
        let wire = send_packet_frame(size).freeze();
        let payload = wire.slice(FRAME_HEADER_LEN..);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(format!("frame_decode_send_packet_{size}"), |b| {
            b.iter(|| Frame::decode(FrameType::SendPacket.as_u8(), black_box(payload.clone())))
        });
        let frame = match Frame::decode(FrameType::SendPacket.as_u8(), payload.clone()) {
            Ok(f) => f,
            Err(e) => panic!("decode: {e}"),
        };
        let mut out = BytesMut::with_capacity(wire.len() * 2);
        g.bench_function(format!("frame_encode_send_packet_{size}"), |b| {
            b.iter(|| {
                out.clear();
                black_box(&frame).encode(&mut out);
                black_box(out.len())
            })
        });
    }
    let pong = Frame::Pong { data: [7; 8] };
    let pong_wire = pong.to_bytes().slice(FRAME_HEADER_LEN..);
    g.throughput(Throughput::Elements(1));
    g.bench_function("frame_decode_pong", |b| {
        b.iter(|| Frame::decode(FrameType::Pong.as_u8(), black_box(pong_wire.clone())))
    });
    g.finish();
}

fn forward_path(c: &mut Criterion) {
    let mut g = quick(c);
    let src = key(1);
    let mut frame = send_packet_frame(1400);
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("rewrite_send_to_recv_1400", |b| {
        b.iter(|| {
            // Put the SendPacket type back so every iteration rewrites a valid SendPacket.
            frame[0] = FrameType::SendPacket.as_u8();
            rewrite_send_to_recv(black_box(&mut frame[..]), black_box(&src))
        })
    });
    let mut forward = BytesMut::new();
    forward.extend_from_slice(&forward_packet_prefix(&src, &key(2), 1400));
    forward.extend_from_slice(&[0x42u8; 1400]);
    g.throughput(Throughput::Bytes(forward.len() as u64));
    g.bench_function("rewrite_forward_to_recv_1400", |b| {
        b.iter(|| {
            // The rewrite leaves the ForwardPacket header in front untouched (the RecvPacket
            // starts 32 bytes in), so the buffer stays a valid ForwardPacket for the next round.
            rewrite_forward_to_recv(black_box(&mut forward[..]))
        })
    });
    g.finish();
}

/// Connects `n` clients to `srv` over in-memory pipes; returns them (kept alive) and the runtime.
fn connect_clients(
    rt: &tokio::runtime::Runtime,
    srv: &Arc<Server>,
    n: usize,
) -> Vec<(NodePublic, Client)> {
    rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (a, b) = tokio::io::duplex(64 << 10);
            let remote: SocketAddr = ([127, 0, 0, 1], 10_000 + (i % 50_000) as u16).into();
            tokio::spawn(srv.accept(b, Bytes::new(), ConnInfo::new(remote)));
            let pk = NodePrivate::generate(&mut rand::thread_rng());
            let mut c = match Client::handshake(a, Bytes::new(), pk, ClientOptions::default()).await
            {
                Ok(c) => c,
                Err(e) => panic!("handshake: {e}"),
            };
            // ServerInfo arrives once the server has registered the client.
            loop {
                match c.recv().await {
                    Ok(ReceivedFrame::ServerInfo(_)) => break,
                    Ok(_) => continue,
                    Err(e) => panic!("recv: {e}"),
                }
            }
            out.push((c.public_key(), c));
        }
        out
    })
}

fn registry_and_relay(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let registry = prometheus::Registry::new();
    let srv = {
        let _g = rt.enter();
        match Server::new(
            ServerConfig::new(NodePrivate::generate(&mut rand::thread_rng())),
            &registry,
        ) {
            Ok(s) => s,
            Err(e) => panic!("server: {e}"),
        }
    };
    let mut clients = connect_clients(&rt, &srv, 1000);
    let present = clients[500].0;
    let absent = key(9);
    let mut g = quick(c);
    g.throughput(Throughput::Elements(1));
    g.bench_function("registry_lookup_hit_1000_conns", |b| {
        b.iter(|| srv.active_connection_id(black_box(&present)))
    });
    g.bench_function("registry_lookup_miss_1000_conns", |b| {
        b.iter(|| srv.active_connection_id(black_box(&absent)))
    });

    // One relay round: client A sends a batch of 32 × 1400-byte packets to B, B reads them all.
    let (b_key, b_client) = clients.pop().unwrap_or_else(|| panic!("no clients"));
    let (_, a_client) = clients.pop().unwrap_or_else(|| panic!("no clients"));
    let (_a_rd, mut a_wr) = a_client.split();
    let (mut b_rd, _b_wr) = b_client.split();
    let payload = vec![0x33u8; 1400];
    const BATCH: u64 = 32;
    g.throughput(Throughput::Bytes(BATCH * 1400));
    g.bench_function("inproc_relay_32x1400", |b| {
        b.iter(|| {
            rt.block_on(async {
                for _ in 0..BATCH {
                    if let Err(e) = a_wr.buffer_packet(b_key, &payload) {
                        panic!("buffer: {e}");
                    }
                }
                if let Err(e) = a_wr.flush().await {
                    panic!("flush: {e}");
                }
                let mut got = 0;
                while got < BATCH {
                    match b_rd.recv().await {
                        Ok(ReceivedFrame::Packet { .. }) => got += 1,
                        Ok(_) => {}
                        Err(e) => panic!("recv: {e}"),
                    }
                }
            })
        })
    });
    g.finish();
    drop(clients);
}

criterion_group!(benches, header, frames, forward_path, registry_and_relay);
criterion_main!(benches);
