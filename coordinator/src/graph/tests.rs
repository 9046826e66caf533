//! Unit and property tests of the pure core: random operation sequences never panic, and what
//! each connection is told stays consistent with the graph.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use proptest::prelude::*;
use proto::tailnet::v2::coordinate_request::{Disconnect, ReadyForHandshake, Tunnel, UpdateSelf};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::{CoordinateRequest, Node};
use uuid::Uuid;

use super::core::{CloseReason, ConnId};
use super::model::store::Store;
use super::model::{Delivery, Event, Outbound, State};
use crate::authz::CoordinateeAuth;

const PEERS: usize = 4;

fn ids() -> Vec<Uuid> {
    (0..PEERS as u128).map(|i| Uuid::from_u128(i + 1)).collect()
}

#[derive(Clone, Debug)]
enum Op {
    Connect(usize, u8),
    Update(usize, i32),
    UpdateNoNode(usize),
    Add(usize, usize),
    Remove(usize, usize),
    Disconnect(usize),
    Lost(usize),
    LostStale(usize),
    Kick(usize),
    Rfh(usize, usize),
    BadUuid(usize),
    Combined(usize, usize, i32),
    Shutdown,
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PEERS;
    prop_oneof![
        4 => (p.clone(), 0u8..4).prop_map(|(a, k)| Op::Connect(a, k)),
        5 => (p.clone(), 0i32..3).prop_map(|(a, d)| Op::Update(a, d)),
        1 => p.clone().prop_map(Op::UpdateNoNode),
        5 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Add(a, b)),
        2 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Remove(a, b)),
        1 => p.clone().prop_map(Op::Disconnect),
        1 => p.clone().prop_map(Op::Lost),
        1 => p.clone().prop_map(Op::LostStale),
        1 => p.clone().prop_map(Op::Kick),
        2 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Rfh(a, b)),
        1 => p.clone().prop_map(Op::BadUuid),
        2 => (p.clone(), p.clone(), 0i32..3).prop_map(|(a, b, d)| Op::Combined(a, b, d)),
        1 => Just(Op::Shutdown),
    ]
}

fn node(derp: i32) -> Node {
    // The key follows the DERP region, so that peers share keys and an update changes its key:
    // what the node key index must follow.
    let key = proto::key::NodePublic::from_bytes([derp as u8 + 1; 32]);
    Node {
        preferred_derp: derp,
        key: Bytes::copy_from_slice(&key.to_np_bytes()),
        ..Default::default()
    }
}

fn tunnel(id: Uuid) -> Option<Tunnel> {
    Some(Tunnel {
        id: Bytes::copy_from_slice(id.as_bytes()),
    })
}

/// The test's model of every connection: what it has been told, and whether it was closed.
#[derive(Default)]
struct World {
    gen: u64,
    current: HashMap<Uuid, ConnId>,
    stale: HashMap<Uuid, ConnId>,
    views: HashMap<ConnId, HashMap<Uuid, Node>>,
    closed: HashSet<ConnId>,
    ever_tunneled: HashSet<(Uuid, Uuid)>,
}

impl World {
    fn conn(&self, id: Uuid) -> ConnId {
        self.current
            .get(&id)
            .copied()
            .unwrap_or(ConnId { peer: id, gen: 0 })
    }

    fn check_deliveries(&mut self, state: &State, ds: &[Delivery]) {
        for d in ds {
            assert!(!self.closed.contains(&d.to), "delivery after close: {d:?}");
            match &d.what {
                Outbound::Updates(us) => {
                    assert!(!us.is_empty());
                    let view = self.views.entry(d.to).or_default();
                    for u in us {
                        let about = Uuid::from_slice(&u.id).unwrap();
                        let pair = (d.to.peer.min(about), d.to.peer.max(about));
                        match Kind::try_from(u.kind).unwrap() {
                            Kind::Node => {
                                assert!(self.ever_tunneled.contains(&pair), "NODE without tunnel");
                                let n = u.node.clone().unwrap();
                                assert_ne!(view.get(&about), Some(&n), "duplicate NODE");
                                view.insert(about, n);
                            }
                            Kind::Lost | Kind::Disconnected => {
                                assert!(u.node.is_none());
                                assert!(
                                    view.remove(&about).is_some(),
                                    "LOST/DISCONNECTED about a peer never announced"
                                );
                            }
                            Kind::ReadyForHandshake => {
                                assert!(self.ever_tunneled.contains(&pair), "RFH without tunnel");
                            }
                            Kind::Unspecified => panic!("unspecified kind"),
                        }
                    }
                }
                Outbound::Error(e) => {
                    assert!(e.starts_with("ready for handshake error"), "{e}");
                }
                Outbound::Close { .. } => {
                    self.closed.insert(d.to);
                    self.views.remove(&d.to);
                }
            }
        }
        // Deliveries only reach live connections or ones closed in this same batch.
        for d in ds {
            assert!(
                state.is_current(d.to) || self.closed.contains(&d.to),
                "delivery to dead connection {d:?}"
            );
        }
        // Live connections' views equal the core's de-dup memory.
        for id in state.peer_ids().collect::<Vec<_>>() {
            let conn = self.current[&id];
            let view = self.views.get(&conn).cloned().unwrap_or_default();
            let mut announced = state.announced_to(id);
            announced.sort();
            let mut viewed: Vec<Uuid> = view.keys().copied().collect();
            viewed.sort();
            assert_eq!(announced, viewed);
            for (about, n) in &view {
                assert_eq!(state.sent_node(id, *about), Some(n));
            }
        }
        self.current.retain(|_, c| state.is_current(*c));
    }

    /// Without remove_tunnel, every live peer knows the current node of every live tunnel peer.
    fn check_converged(&self, state: &State) {
        for r in state.peer_ids().collect::<Vec<_>>() {
            for x in state.peer_ids().collect::<Vec<_>>() {
                if r == x || !state.store().tunnel_between(r, x) {
                    continue;
                }
                let Some(n) = state.node(x) else { continue };
                let view = self.views.get(&self.current[&r]);
                assert_eq!(
                    view.and_then(|v| v.get(&x)),
                    Some(n),
                    "{r} does not know {x}"
                );
            }
        }
    }
}

fn run(ops: Vec<Op>, converge: bool) {
    let ids = ids();
    let mut state = State::default();
    let mut w = World::default();
    for op in ops {
        let ev = match op {
            Op::Connect(a, kind) => {
                w.gen += 1;
                let conn = ConnId {
                    peer: ids[a],
                    gen: w.gen,
                };
                if let Some(old) = w.current.insert(ids[a], conn) {
                    w.stale.insert(ids[a], old);
                }
                let auth = match kind {
                    0 => CoordinateeAuth::Agent { id: ids[a] },
                    1 => CoordinateeAuth::Client {
                        agent_id: ids[(a + 1) % PEERS],
                    },
                    _ => CoordinateeAuth::SingleTailnet,
                };
                Event::Connect { conn, auth }
            }
            Op::Update(a, d) => Event::Request {
                conn: w.conn(ids[a]),
                req: CoordinateRequest {
                    update_self: Some(UpdateSelf {
                        node: Some(node(d)),
                    }),
                    ..Default::default()
                },
            },
            Op::UpdateNoNode(a) => Event::Request {
                conn: w.conn(ids[a]),
                req: CoordinateRequest {
                    update_self: Some(UpdateSelf { node: None }),
                    ..Default::default()
                },
            },
            Op::Add(a, b) => Event::Request {
                conn: w.conn(ids[a]),
                req: CoordinateRequest {
                    add_tunnel: tunnel(ids[b]),
                    ..Default::default()
                },
            },
            Op::Remove(a, b) => Event::Request {
                conn: w.conn(ids[a]),
                req: CoordinateRequest {
                    remove_tunnel: tunnel(ids[b]),
                    ..Default::default()
                },
            },
            Op::Disconnect(a) => Event::Request {
                conn: w.conn(ids[a]),
                req: CoordinateRequest {
                    disconnect: Some(Disconnect {}),
                    ..Default::default()
                },
            },
            Op::Lost(a) => Event::Lost {
                conn: w.conn(ids[a]),
            },
            Op::LostStale(a) => Event::Lost {
                conn: w.stale.get(&ids[a]).copied().unwrap_or(ConnId {
                    peer: ids[a],
                    gen: 0,
                }),
            },
            Op::Kick(a) => Event::Kick {
                conn: w.conn(ids[a]),
            },
            Op::Rfh(a, b) => Event::Request {
                conn: w.conn(ids[a]),
                req: CoordinateRequest {
                    ready_for_handshake: vec![ReadyForHandshake {
                        id: Bytes::copy_from_slice(ids[b].as_bytes()),
                    }],
                    ..Default::default()
                },
            },
            Op::BadUuid(a) => Event::Request {
                conn: w.conn(ids[a]),
                req: CoordinateRequest {
                    add_tunnel: Some(Tunnel {
                        id: Bytes::from_static(&[1, 2]),
                    }),
                    ..Default::default()
                },
            },
            Op::Combined(a, b, d) => Event::Request {
                conn: w.conn(ids[a]),
                req: CoordinateRequest {
                    update_self: Some(UpdateSelf {
                        node: Some(node(d)),
                    }),
                    add_tunnel: tunnel(ids[b]),
                    ready_for_handshake: vec![ReadyForHandshake {
                        id: Bytes::copy_from_slice(ids[b].as_bytes()),
                    }],
                    ..Default::default()
                },
            },
            Op::Shutdown => Event::Shutdown,
        };
        // Record tunnels the request may add (authorization may still refuse it).
        if let Event::Request { conn, req } = &ev {
            if let Some(t) = &req.add_tunnel {
                if let Ok(dst) = Uuid::from_slice(&t.id) {
                    if state.is_current(*conn) {
                        w.ever_tunneled
                            .insert((conn.peer.min(dst), conn.peer.max(dst)));
                    }
                }
            }
        }
        let ds = state.apply(ev);
        w.check_deliveries(&state, &ds);
        if converge {
            w.check_converged(&state);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_ops_keep_invariants(ops in proptest::collection::vec(op(), 0..60)) {
        run(ops, false);
    }

    #[test]
    fn without_removals_views_converge(ops in proptest::collection::vec(op().prop_filter("no remove_tunnel", |o| !matches!(o, Op::Remove(..))), 0..60)) {
        run(ops, true);
    }
}

#[test]
fn overwrite_closes_old_connection_only() {
    let id = Uuid::from_u128(9);
    let mut s = State::default();
    let c1 = ConnId { peer: id, gen: 1 };
    let c2 = ConnId { peer: id, gen: 2 };
    let auth = CoordinateeAuth::SingleTailnet;
    s.apply(Event::Connect {
        conn: c1,
        auth: auth.clone(),
    });
    let ds = s.apply(Event::Connect { conn: c2, auth });
    assert_eq!(
        ds,
        vec![Delivery {
            to: c1,
            what: Outbound::Close {
                error: Some(super::ERR_OVERWRITTEN.into()),
                reason: CloseReason::Overwritten
            }
        }]
    );
    assert!(s.apply(Event::Lost { conn: c1 }).is_empty());
    assert!(s.is_current(c2));
    assert_eq!(s.peer_count(), 1);
}

/// The sharded [`super::PeerGraph`] against the pure core, on the same random operation sequences:
/// after every operation each connection must have received exactly what the core says (per
/// subject peer, in order; the same errors; ended or not), and the graph's counts, nodes and every
/// connection's de-duplication memory must equal the core's.
mod differential {
    use std::collections::{BTreeMap, HashMap};

    use prometheus::Registry;
    use proptest::prelude::*;
    use proto::tailnet::v2::CoordinateResponse;
    use uuid::Uuid;

    use super::{ids, node, op, tunnel, Op, PEERS};
    use crate::authz::CoordinateeAuth;
    use crate::graph::core::ConnId;
    use crate::graph::model::{Delivery, Outbound, State};
    use crate::graph::{
        GraphConfig, PeerGraph, PeerHandle, PeerReceiver, TryRecvError,
        MAX_PEER_UPDATES_PER_RESPONSE,
    };
    use proto::tailnet::v2::coordinate_request::{
        Disconnect, ReadyForHandshake, Tunnel, UpdateSelf,
    };
    use proto::tailnet::v2::CoordinateRequest;

    /// What one connection observed during one operation.
    #[derive(Debug, Default, PartialEq)]
    struct Seen {
        /// Per subject: (kind, node, reason) in arrival order.
        about: BTreeMap<Uuid, Vec<(i32, Option<proto::tailnet::v2::Node>, String)>>,
        errors: Vec<String>,
        responses: usize,
        ended: bool,
    }

    impl Seen {
        fn add(&mut self, r: CoordinateResponse) {
            self.responses += 1;
            if !r.error.is_empty() {
                self.errors.push(r.error);
            }
            for u in r.peer_updates {
                let about = Uuid::from_slice(&u.id).unwrap();
                self.about
                    .entry(about)
                    .or_default()
                    .push((u.kind, u.node, u.reason));
            }
        }
    }

    /// The core's deliveries to one connection, queued with the outbox's semantics.
    #[derive(Default)]
    struct Model {
        queue: Vec<CoordinateResponse>,
        closing: Option<Option<String>>,
        ended: bool,
    }

    impl Model {
        fn apply(&mut self, what: Outbound) {
            if self.closing.is_some() {
                return;
            }
            match what {
                Outbound::Updates(us) => {
                    for chunk in us.chunks(MAX_PEER_UPDATES_PER_RESPONSE) {
                        self.queue.push(CoordinateResponse {
                            peer_updates: chunk.to_vec(),
                            error: String::new(),
                        });
                    }
                }
                Outbound::Error(error) => self.queue.push(CoordinateResponse {
                    peer_updates: vec![],
                    error,
                }),
                Outbound::Close { error, .. } => {
                    self.queue.clear();
                    self.closing = Some(error);
                }
            }
        }

        fn drain(&mut self) -> Seen {
            let mut seen = Seen::default();
            for r in self.queue.drain(..) {
                seen.add(r);
            }
            if let Some(closing) = self.closing.as_mut() {
                if let Some(error) = closing.take() {
                    seen.add(CoordinateResponse {
                        peer_updates: vec![],
                        error,
                    });
                }
                self.ended = true;
            }
            seen.ended = self.ended;
            seen
        }
    }

    fn drain(rx: &mut PeerReceiver) -> Seen {
        let mut seen = Seen::default();
        loop {
            match rx.try_recv() {
                Ok(r) => seen.add(r),
                Err(TryRecvError::Empty) => return seen,
                Err(TryRecvError::Ended) => {
                    seen.ended = true;
                    return seen;
                }
            }
        }
    }

    struct Both {
        graph: std::sync::Arc<PeerGraph>,
        state: State,
        /// Latest handle per peer (kept after its connection ended, until replaced or dropped).
        handles: HashMap<Uuid, PeerHandle>,
        /// The previous handle of a replaced connection.
        stale: HashMap<Uuid, PeerHandle>,
        receivers: HashMap<ConnId, (PeerReceiver, Model)>,
    }

    impl Both {
        fn conn(&self, id: Uuid) -> Option<ConnId> {
            self.handles.get(&id).map(PeerHandle::conn)
        }

        fn deliver(&mut self, ds: Vec<Delivery>) {
            for d in ds {
                let (_, model) = self
                    .receivers
                    .get_mut(&d.to)
                    .unwrap_or_else(|| panic!("delivery to unknown connection {d:?}"));
                model.apply(d.what);
            }
        }

        fn request(&mut self, id: Uuid, req: CoordinateRequest) {
            let Some(h) = self.handles.get(&id) else {
                // Never connected: the core ignores it too.
                let conn = ConnId { peer: id, gen: 0 };
                let mut out = Vec::new();
                let _ = self.state.request(conn, &req, &mut out);
                assert!(out.is_empty());
                return;
            };
            let conn = h.conn();
            let got = self.graph.handle(h, req.clone());
            let mut out = Vec::new();
            let want = self.state.request(conn, &req, &mut out);
            assert_eq!(got, want, "handle result");
            self.deliver(out);
        }

        fn lost(&mut self, h: Option<PeerHandle>) {
            let Some(h) = h else { return };
            let conn = h.conn();
            drop(h);
            let mut out = Vec::new();
            self.state.lost(conn, &mut out);
            self.deliver(out);
        }

        fn check(&mut self) {
            for (conn, (rx, model)) in self.receivers.iter_mut() {
                let got = drain(rx);
                let want = model.drain();
                assert_eq!(got, want, "stream of {conn:?}");
            }
            assert_eq!(self.graph.peer_count(), self.state.peer_count());
            assert_eq!(self.graph.tunnel_count(), self.state.tunnel_count());
            for id in ids() {
                assert_eq!(
                    self.graph.node(id).as_ref(),
                    self.state.node(id),
                    "node of {id}"
                );
            }
            // The node key index holds exactly the keys of the nodes the graph holds.
            let keys: std::collections::HashSet<proto::key::NodePublic> = ids()
                .into_iter()
                .filter_map(|id| self.state.node(id))
                .filter_map(|n| proto::key::NodePublic::from_np_bytes(&n.key).ok())
                .filter(|k| !k.is_zero())
                .collect();
            assert_eq!(self.graph.node_key_count(), keys.len(), "node key index");
            for k in &keys {
                assert!(self.graph.knows_node_key(k), "node key index lacks {k}");
            }
            for h in self.handles.values() {
                let conn = h.conn();
                if !self.state.is_current(conn) {
                    continue;
                }
                let sent = h.conn.outbox.sent_snapshot();
                let mut announced = self.state.announced_to(conn.peer);
                announced.sort();
                let mut keys: Vec<Uuid> = sent.keys().copied().collect();
                keys.sort();
                assert_eq!(keys, announced, "de-dup memory of {conn:?}");
                for (about, n) in &sent {
                    assert_eq!(self.state.sent_node(conn.peer, *about), Some(n));
                }
            }
        }
    }

    fn run(ops: Vec<Op>, shards: usize) {
        let ids = ids();
        let reg = Registry::new();
        let mut b = Both {
            graph: PeerGraph::with_shards(GraphConfig::default(), shards, &reg).unwrap(),
            state: State::default(),
            handles: HashMap::new(),
            stale: HashMap::new(),
            receivers: HashMap::new(),
        };
        for op in ops {
            match op {
                Op::Connect(a, kind) => {
                    let auth = match kind {
                        0 => CoordinateeAuth::Agent { id: ids[a] },
                        1 => CoordinateeAuth::Client {
                            agent_id: ids[(a + 1) % PEERS],
                        },
                        _ => CoordinateeAuth::SingleTailnet,
                    };
                    let (h, rx) = b.graph.connect(ids[a], "p".into(), auth.clone());
                    let conn = h.conn();
                    b.receivers.insert(conn, (rx, Model::default()));
                    if let Some(old) = b.handles.insert(ids[a], h) {
                        // Dropping the stale handle this displaces must be a no-op in both.
                        let older = b.stale.insert(ids[a], old);
                        b.lost(older);
                    }
                    let out = b
                        .state
                        .apply(crate::graph::model::Event::Connect { conn, auth });
                    b.deliver(out);
                }
                Op::Update(a, d) => b.request(
                    ids[a],
                    CoordinateRequest {
                        update_self: Some(UpdateSelf {
                            node: Some(node(d)),
                        }),
                        ..Default::default()
                    },
                ),
                Op::UpdateNoNode(a) => b.request(
                    ids[a],
                    CoordinateRequest {
                        update_self: Some(UpdateSelf { node: None }),
                        ..Default::default()
                    },
                ),
                Op::Add(a, c) => b.request(
                    ids[a],
                    CoordinateRequest {
                        add_tunnel: tunnel(ids[c]),
                        ..Default::default()
                    },
                ),
                Op::Remove(a, c) => b.request(
                    ids[a],
                    CoordinateRequest {
                        remove_tunnel: tunnel(ids[c]),
                        ..Default::default()
                    },
                ),
                Op::Disconnect(a) => b.request(
                    ids[a],
                    CoordinateRequest {
                        disconnect: Some(Disconnect {}),
                        ..Default::default()
                    },
                ),
                Op::Lost(a) => {
                    let h = b.handles.remove(&ids[a]);
                    b.lost(h);
                }
                Op::LostStale(a) => {
                    let h = b.stale.remove(&ids[a]);
                    b.lost(h);
                }
                Op::Kick(a) => {
                    if let Some(conn) = b.conn(ids[a]) {
                        b.graph.kick(conn);
                        let mut out = Vec::new();
                        b.state.kick(conn, &mut out);
                        b.deliver(out);
                    }
                }
                Op::Rfh(a, c) => b.request(
                    ids[a],
                    CoordinateRequest {
                        ready_for_handshake: vec![ReadyForHandshake {
                            id: bytes::Bytes::copy_from_slice(ids[c].as_bytes()),
                        }],
                        ..Default::default()
                    },
                ),
                Op::BadUuid(a) => b.request(
                    ids[a],
                    CoordinateRequest {
                        add_tunnel: Some(Tunnel {
                            id: bytes::Bytes::from_static(&[1, 2]),
                        }),
                        ..Default::default()
                    },
                ),
                Op::Combined(a, c, d) => b.request(
                    ids[a],
                    CoordinateRequest {
                        update_self: Some(UpdateSelf {
                            node: Some(node(d)),
                        }),
                        add_tunnel: tunnel(ids[c]),
                        ready_for_handshake: vec![ReadyForHandshake {
                            id: bytes::Bytes::copy_from_slice(ids[c].as_bytes()),
                        }],
                        ..Default::default()
                    },
                ),
                Op::Shutdown => {
                    b.graph.shutdown();
                    let out = b.state.apply(crate::graph::model::Event::Shutdown);
                    b.deliver(out);
                }
            }
            b.check();
        }
        // Dropping everything leaves an empty graph.
        let stale: Vec<PeerHandle> = b.stale.drain().map(|(_, h)| h).collect();
        for h in stale {
            b.lost(Some(h));
        }
        let live: Vec<PeerHandle> = b.handles.drain().map(|(_, h)| h).collect();
        for h in live {
            b.lost(Some(h));
        }
        b.check();
        assert_eq!(b.graph.peer_count(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(384))]

        #[test]
        fn sharded_graph_matches_core(
            ops in proptest::collection::vec(op(), 0..80),
            shards in prop_oneof![Just(1usize), Just(2), Just(3), Just(16)],
        ) {
            run(ops, shards);
        }
    }
}

/// Updates of a peer on one shard do not wait for another shard's lock, even when they fan out to
/// a receiver living in that locked shard; updates of a peer on the locked shard do wait.
#[test]
fn updates_on_other_shards_proceed_while_a_shard_is_locked() {
    use std::sync::mpsc;
    use std::time::Duration;

    use prometheus::Registry;

    use crate::graph::{GraphConfig, PeerGraph};

    let reg = Registry::new();
    let g = PeerGraph::with_shards(GraphConfig::default(), 16, &reg).unwrap();
    let a = Uuid::new_v4();
    let held = g.shards.index(a);
    let b = std::iter::repeat_with(Uuid::new_v4)
        .find(|x| g.shards.index(*x) != held)
        .unwrap();
    let c = std::iter::repeat_with(Uuid::new_v4)
        .find(|x| *x != a && g.shards.index(*x) == held)
        .unwrap();
    let single = CoordinateeAuth::SingleTailnet;
    let (ha, _ra) = g.connect(a, "a".into(), single.clone());
    let (hb, _rb) = g.connect(b, "b".into(), single.clone());
    let (hc, mut rc) = g.connect(c, "c".into(), single);
    let add = |to: Uuid| CoordinateRequest {
        add_tunnel: tunnel(to),
        ..Default::default()
    };
    let upd = |d: i32| CoordinateRequest {
        update_self: Some(UpdateSelf {
            node: Some(node(d)),
        }),
        ..Default::default()
    };
    g.handle(&hc, add(b)).unwrap();
    g.handle(&hc, add(a)).unwrap();

    let guard = g.shards.lock_index(held);
    let (tx, rx) = mpsc::channel::<&str>();
    std::thread::scope(|s| {
        let tx_b = tx.clone();
        let (g1, hb) = (&g, &hb);
        s.spawn(move || {
            g1.handle(hb, upd(1)).unwrap();
            tx_b.send("b").unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok("b"));
        let tx_a = tx.clone();
        let (g2, ha) = (&g, &ha);
        s.spawn(move || {
            g2.handle(ha, upd(2)).unwrap();
            tx_a.send("a").unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(guard);
        assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok("a"));
    });
    // c (on the locked shard) got b's update while its shard was held, then a's.
    let mut about = Vec::new();
    while let Ok(r) = rc.try_recv() {
        for u in r.peer_updates {
            about.push(Uuid::from_slice(&u.id).unwrap());
        }
    }
    assert_eq!(about, vec![b, a]);
}

/// The status page's snapshot: connected peers with role, home region and last update, tunnels
/// (also to an absent peer), bounded with the full counts, and the update latency histogram.
#[test]
fn snapshot_lists_peers_and_tunnels_bounded() {
    use prometheus::Registry;

    use crate::graph::{GraphConfig, PeerGraph};

    let reg = Registry::new();
    let g = PeerGraph::with_shards(GraphConfig::default(), 4, &reg).unwrap();
    let (agent, client, absent) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (ha, _ra) = g.connect(
        agent,
        "agent <b>".into(),
        CoordinateeAuth::Agent { id: agent },
    );
    let (hc, _rc) = g.connect(client, "c".into(), CoordinateeAuth::SingleTailnet);
    g.handle(
        &ha,
        CoordinateRequest {
            update_self: Some(UpdateSelf {
                node: Some(node(3)),
            }),
            ..Default::default()
        },
    )
    .unwrap();
    for to in [agent, absent] {
        g.handle(
            &hc,
            CoordinateRequest {
                add_tunnel: tunnel(to),
                ..Default::default()
            },
        )
        .unwrap();
    }
    let s = g.snapshot(1000);
    assert_eq!((s.total_peers, s.total_tunnels), (2, 2));
    let a = s.peers.iter().find(|p| p.id == agent).unwrap();
    assert_eq!(
        (a.role, a.name.as_str(), a.home_region),
        ("agent", "agent <b>", Some(3))
    );
    assert!(a.last_update.is_some_and(|d| d.as_secs() < 60));
    let c = s.peers.iter().find(|p| p.id == client).unwrap();
    assert_eq!(
        (
            c.role,
            c.home_region,
            c.last_update.is_none(),
            c.tunnels_out
        ),
        ("other", None, true, 2)
    );
    let mut t: Vec<(Uuid, bool)> = s.tunnels.iter().map(|t| (t.dst, t.dst_connected)).collect();
    t.sort();
    let mut want = vec![(agent, true), (absent, false)];
    want.sort();
    assert_eq!(t, want);
    assert!(s.tunnels.iter().all(|t| t.src == client));

    let bounded = g.snapshot(1);
    assert_eq!((bounded.peers.len(), bounded.tunnels.len()), (1, 1));
    assert_eq!((bounded.total_peers, bounded.total_tunnels), (2, 2));

    let text = prometheus::TextEncoder::new()
        .encode_to_string(&reg.gather())
        .unwrap();
    assert!(
        text.contains("coordinator_node_update_seconds_count 1"),
        "{text}"
    );
    drop((ha, hc));
    assert_eq!(g.snapshot(10).total_peers, 0);
}
