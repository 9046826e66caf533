//! Peer-graph microbenchmarks: one agent's `update_self` fanned out to 1, 100 and 10,000 client
//! subscribers (time = the graph transition + pushing into every queue + every receiver draining
//! its queue into the protobuf bytes its session sends, as `service.rs` does with
//! `try_recv_encoded`), and one client's update reaching its agent.

use std::sync::Arc;
use std::time::Duration;

use benches::fixtures::{add_tunnel, node, update_self};
use bytes::BytesMut;
use coordinator::authz::CoordinateeAuth;
use coordinator::graph::{Encoded, GraphConfig, PeerGraph, PeerHandle, PeerReceiver};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use uuid::Uuid;

struct Setup {
    graph: Arc<PeerGraph>,
    agent: PeerHandle,
    agent_rx: PeerReceiver,
    agent_id: Uuid,
    clients: Vec<(PeerHandle, PeerReceiver, Uuid)>,
}

fn drain(rx: &mut PeerReceiver) -> usize {
    let mut wire = BytesMut::new();
    let mut n = 0;
    while let Ok(taken) = rx.try_recv_encoded(&mut wire) {
        match taken {
            Encoded::Appended(k) => n += k,
            Encoded::Whole(resp) => n += resp.peer_updates.len(),
        }
    }
    black_box(wire);
    n
}

fn setup(n: usize) -> Setup {
    let registry = prometheus::Registry::new();
    let graph = match PeerGraph::new(GraphConfig::default(), &registry) {
        Ok(g) => g,
        Err(e) => panic!("graph: {e}"),
    };
    let agent_id = Uuid::new_v4();
    let (agent, mut agent_rx) = graph.connect(
        agent_id,
        "agent".into(),
        CoordinateeAuth::Agent { id: agent_id },
    );
    if let Err(e) = graph.handle(&agent, update_self(node(agent_id, true, 1))) {
        panic!("agent update: {e}");
    }
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let id = Uuid::new_v4();
        let (h, mut rx) = graph.connect(id, "client".into(), CoordinateeAuth::Client { agent_id });
        if let Err(e) = graph.handle(&h, add_tunnel(agent_id)) {
            panic!("add_tunnel: {e}");
        }
        if let Err(e) = graph.handle(&h, update_self(node(id, false, 1))) {
            panic!("client update: {e}");
        }
        drain(&mut rx);
        drain(&mut agent_rx);
        clients.push((h, rx, id));
    }
    Setup {
        graph,
        agent,
        agent_rx,
        agent_id,
        clients,
    }
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("graph");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for n in [1usize, 100, 10_000] {
        let mut s = setup(n);
        // Pre-built nodes so the measurement excludes building them.
        let nodes: Vec<_> = (0..64).map(|i| node(s.agent_id, true, 100 + i)).collect();
        let mut k = 0usize;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("agent_update_fanout_{n}"), |b| {
            b.iter(|| {
                k = (k + 1) % nodes.len();
                if let Err(e) = s.graph.handle(&s.agent, update_self(nodes[k].clone())) {
                    panic!("update: {e}");
                }
                let mut got = 0;
                for (_, rx, _) in s.clients.iter_mut() {
                    got += drain(rx);
                }
                assert_eq!(got, n, "every subscriber gets exactly one update");
                black_box(got)
            })
        });
        if n == 100 {
            let (h, _, id) = &s.clients[0];
            let cnodes: Vec<_> = (0..64).map(|i| node(*id, false, 100 + i)).collect();
            let mut k = 0usize;
            g.throughput(Throughput::Elements(1));
            g.bench_function("client_update_to_agent", |b| {
                b.iter(|| {
                    k = (k + 1) % cnodes.len();
                    if let Err(e) = s.graph.handle(h, update_self(cnodes[k].clone())) {
                        panic!("update: {e}");
                    }
                    black_box(drain(&mut s.agent_rx))
                })
            });
        }
        drop(s);
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
