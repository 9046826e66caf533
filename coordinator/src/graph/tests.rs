//! Unit and property tests of the pure core: random operation sequences never panic, and what
//! each connection is told stays consistent with the graph.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use proptest::prelude::*;
use proto::tailnet::v2::coordinate_request::{Disconnect, ReadyForHandshake, Tunnel, UpdateSelf};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::{CoordinateRequest, Node};
use uuid::Uuid;

use super::core::{CloseReason, ConnId, Delivery, Event, Outbound, State};
use super::store::Store;
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
    Node {
        preferred_derp: derp,
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
                Event::Connect {
                    conn,
                    name: "p".into(),
                    auth,
                }
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
        name: "a".into(),
        auth: auth.clone(),
    });
    let ds = s.apply(Event::Connect {
        conn: c2,
        name: "a".into(),
        auth,
    });
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
