//! Admission: who may complete the handshake. A refused client is closed after ClientInfo with
//! no frame (derper's behaviour); an unknown key may be admitted for a grace period and is
//! closed if it does not become known; a verify URL is asked with derper's protocol, with
//! fail-open and fail-closed when it cannot be reached. Mesh peers are never asked.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use bytes::Bytes;
use derp::edge::verify_url::UrlVerifier;
use derp::{Client, ClientOptions, KnownKeys, ReceivedFrame};
use proto::key::{MeshKey, NodePrivate, NodePublic};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;

/// A shared set of "coordinated" keys, what the binary's graph lookup stands for here.
#[derive(Clone, Default)]
struct Known(Arc<Mutex<HashSet<NodePublic>>>);

impl Known {
    fn add(&self, k: NodePublic) {
        self.0.lock().unwrap().insert(k);
    }
    fn admission(&self, grace: Duration) -> Arc<dyn derp::Admission> {
        let set = self.0.clone();
        Arc::new(KnownKeys::new(
            move |k| set.lock().unwrap().contains(k),
            grace,
        ))
    }
}

/// Handshakes without waiting for ServerInfo (a refused client never gets one).
async fn dial(ts: &TestServer, k: NodePrivate, opts: ClientOptions) -> Client {
    let tcp = TcpStream::connect(ts.addr).await.unwrap();
    Client::handshake(tcp, Bytes::new(), k, opts).await.unwrap()
}

/// The connection ends before any frame but the ServerKey arrives.
async fn expect_refused(c: &mut Client) {
    let r = within(c.recv()).await;
    assert!(r.is_err(), "a refused client got {r:?}");
}

fn decision(ts: &TestServer, d: &str) -> f64 {
    ts.metric(&format!("derp_admission_total{{decision=\"{d}\"}}"))
}

#[tokio::test]
async fn core_unknown_key_refused_known_key_admitted() {
    let known = Known::default();
    let adm = known.admission(Duration::ZERO);
    let ts = TestServer::with_config(|c| c.admission = Some(adm)).await;
    let mut stranger = dial(&ts, key(), ClientOptions::default()).await;
    expect_refused(&mut stranger).await;
    assert_eq!(decision(&ts, "refused"), 1.0);
    assert_eq!(
        ts.metric("derp_handshake_failures{reason=\"admission_denied\"}"),
        1.0
    );
    assert_eq!(ts.server.connection_count(), 0);

    let (a, b) = (key(), key());
    known.add(a.public());
    known.add(b.public());
    let mut ca = ts.client_with(a, ClientOptions::default()).await;
    let mut cb = ts.client_with(b, ClientOptions::default()).await;
    assert_eq!(decision(&ts, "admitted"), 2.0);
    assert_pair_relays(&ts, &mut ca, &mut cb, b"admitted").await;
}

#[tokio::test]
async fn core_mesh_peers_are_never_asked() {
    const MESH: MeshKey = MeshKey::from_bytes([0x42; 32]);
    let adm = Known::default().admission(Duration::ZERO);
    let ts = TestServer::with_config(|c| {
        c.admission = Some(adm);
        c.mesh_key = Some(MESH);
    })
    .await;
    let opts = ClientOptions {
        mesh_key: Some(MESH),
        ..Default::default()
    };
    let _mesh = ts.client_with(key(), opts).await;
    assert_eq!(decision(&ts, "admitted") + decision(&ts, "refused"), 0.0);
}

#[tokio::test]
async fn core_pending_key_confirmed_when_its_node_arrives_in_the_grace_period() {
    let known = Known::default();
    let adm = known.admission(Duration::from_millis(400));
    let ts = TestServer::with_config(|c| c.admission = Some(adm)).await;
    let (late, never, peer) = (key(), key(), key());
    known.add(peer.public());
    let late_pub = late.public();
    let mut c_late = ts.client_with(late, ClientOptions::default()).await;
    let mut c_never = ts.client_with(never, ClientOptions::default()).await;
    let mut c_peer = ts.client_with(peer, ClientOptions::default()).await;
    assert_eq!(decision(&ts, "pending"), 2.0);
    // Pending keys relay like any other while the grace period runs.
    assert_pair_relays(&ts, &mut c_late, &mut c_peer, b"pending").await;
    // The late key's node arrives within the grace period.
    known.add(late_pub);
    ts.wait_metric("derp_admission_total{decision=\"expired\"}", 1.0)
        .await;
    ts.wait_metric("derp_admission_total{decision=\"confirmed\"}", 1.0)
        .await;
    expect_closed(&mut c_never).await;
    ts.wait_connections(2).await;
    assert_pair_relays(&ts, &mut c_late, &mut c_peer, b"confirmed").await;
}

/// A verify-client-url test server: answers with the given status and body, and records every
/// request body.
async fn verifier(status: u16, body: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/admit",
        post(move |req: String| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(req);
                (http::StatusCode::from_u16(status).unwrap(), body)
            }
        }),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}/admit"), seen)
}

async fn url_server(url: &str, fail_open: bool) -> TestServer {
    let v = UrlVerifier::new(url, fail_open, &[])
        .unwrap()
        .with_timeout(Duration::from_millis(500));
    TestServer::with_config(|c| c.admission = Some(Arc::new(v))).await
}

#[tokio::test]
async fn core_verify_url_allow_sends_derpers_request() {
    let (url, seen) = verifier(200, r#"{"Allow":true}"#).await;
    let ts = url_server(&url, false).await;
    let k = key();
    let _c = ts.client_with(k.clone(), ClientOptions::default()).await;
    assert_eq!(decision(&ts, "admitted"), 1.0);
    let bodies = seen.lock().unwrap().clone();
    assert_eq!(
        bodies,
        [format!(
            r#"{{"NodePublic":"{}","Source":"127.0.0.1"}}"#,
            k.public()
        )]
    );
}

#[tokio::test]
async fn core_verify_url_deny_and_non_200_refuse() {
    for (status, body) in [
        (200, r#"{"Allow":false}"#),
        (403, r#"{"Allow":true}"#),
        (200, "nonsense"),
    ] {
        let (url, seen) = verifier(status, body).await;
        let ts = url_server(&url, true).await;
        let mut c = dial(&ts, key(), ClientOptions::default()).await;
        expect_refused(&mut c).await;
        assert_eq!(decision(&ts, "refused"), 1.0, "{status} {body}");
        assert_eq!(seen.lock().unwrap().len(), 1);
        // Answers, however negative, are not verifier errors.
        assert_eq!(ts.metric("derp_admission_verifier_errors_total"), 0.0);
    }
}

/// A URL nothing listens on.
async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/admit")
}

#[tokio::test]
async fn core_verify_url_unreachable_fails_open_or_closed() {
    let url = dead_url().await;
    let open = url_server(&url, true).await;
    let _c = open.client_with(key(), ClientOptions::default()).await;
    assert_eq!(open.metric("derp_admission_verifier_errors_total"), 1.0);
    assert_eq!(decision(&open, "admitted"), 1.0);

    let closed = url_server(&url, false).await;
    let mut c = dial(&closed, key(), ClientOptions::default()).await;
    expect_refused(&mut c).await;
    assert_eq!(closed.metric("derp_admission_verifier_errors_total"), 1.0);
    assert_eq!(decision(&closed, "refused"), 1.0);
}

#[tokio::test]
async fn core_verify_url_that_never_answers_times_out_into_the_policy() {
    // Accepts and reads, never answers.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/admit", l.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let closed = url_server(&url, false).await;
    let mut c = dial(&closed, key(), ClientOptions::default()).await;
    expect_refused(&mut c).await;
    assert_eq!(closed.metric("derp_admission_verifier_errors_total"), 1.0);
    let open = url_server(&url, true).await;
    let mut c = open.client_with(key(), ClientOptions::default()).await;
    assert!(matches!(
        tokio::time::timeout(Duration::from_millis(50), c.recv()).await,
        Err(_) | Ok(Ok(ReceivedFrame::KeepAlive))
    ));
    assert_eq!(open.metric("derp_admission_verifier_errors_total"), 1.0);
}
