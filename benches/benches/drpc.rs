//! dRPC microbenchmarks: packet encoding (frame splitting) and `PacketAssembler` reassembly of a
//! realistic Coordinate stream (small CoordinateResponse messages) and of one large packet split
//! into 64 KiB frames, plus protobuf encode/decode of the messages themselves.

use std::time::Duration;

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use proto::drpc::{encode_packet, Kind, PacketAssembler};
use proto::tailnet::v2::CoordinateResponse;

fn quick(c: &mut Criterion) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group("drpc");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g
}

fn drpc(c: &mut Criterion) {
    let mut g = quick(c);
    let one = benches::fixtures::response(1);
    let one_bytes = one.encode_to_vec();
    let big = benches::fixtures::response(1024);
    let big_bytes = big.encode_to_vec();

    g.throughput(Throughput::Bytes(one_bytes.len() as u64));
    let mut out = BytesMut::with_capacity(1 << 20);
    g.bench_function("encode_packet_1_update", |b| {
        b.iter(|| {
            out.clear();
            encode_packet(1, 7, Kind::Message, black_box(&one_bytes), &mut out);
            black_box(out.len())
        })
    });

    // 64 small packets back to back, reassembled from one buffer.
    let mut stream = BytesMut::new();
    for id in 1..=64u64 {
        encode_packet(1, id, Kind::Message, &one_bytes, &mut stream);
    }
    let stream = stream.freeze();
    g.throughput(Throughput::Elements(64));
    g.bench_function("reassemble_64_small_packets", |b| {
        b.iter(|| {
            let mut asm = PacketAssembler::new();
            let mut buf = BytesMut::from(&stream[..]);
            let mut n = 0usize;
            if let Err(e) = asm.feed(&mut buf, |p| {
                n += p.data.len();
            }) {
                panic!("feed: {e}");
            }
            black_box(n)
        })
    });

    // One large packet (1024 peer updates, split into 64 KiB frames).
    let mut large = BytesMut::new();
    encode_packet(1, 1, Kind::Message, &big_bytes, &mut large);
    let large = large.freeze();
    g.throughput(Throughput::Bytes(big_bytes.len() as u64));
    g.bench_function("encode_packet_1024_updates", |b| {
        b.iter(|| {
            out.clear();
            encode_packet(1, 1, Kind::Message, black_box(&big_bytes), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("reassemble_1024_updates", |b| {
        b.iter(|| {
            let mut asm = PacketAssembler::new();
            let mut buf = BytesMut::from(&large[..]);
            let mut n = 0usize;
            if let Err(e) = asm.feed(&mut buf, |p| n += p.data.len()) {
                panic!("feed: {e}");
            }
            black_box(n)
        })
    });

    g.throughput(Throughput::Elements(1));
    g.bench_function("protobuf_encode_response_1_update", |b| {
        b.iter(|| black_box(&one).encode_to_vec())
    });
    g.bench_function("protobuf_decode_response_1_update", |b| {
        b.iter(|| CoordinateResponse::decode(black_box(&one_bytes[..])))
    });
    g.finish();
}

criterion_group!(benches, drpc);
criterion_main!(benches);
