//! Helpers shared by the in-process harness (`common`), the sidecar harness (`upstream_harness`)
//! and the tests that build their own servers: tracing, WebSocket dials, metrics, refused dials.

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket as `tokio_tungstenite::connect_async` returns it.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Header carrying a Coder token.
pub const SESSION_TOKEN: &str = "Coder-Session-Token";

/// Logs to the test output, filtered by `RUST_LOG` (default `warn`); once per binary.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Dials the WebSocket `url` (`ws://...`) with `headers`; a header with an empty value is left out
/// (a dial without a token).
pub async fn ws_dial(url: &str, headers: &[(&str, &str)]) -> Result<Ws, Box<tungstenite::Error>> {
    let mut req = url.into_client_request().unwrap();
    for (name, value) in headers.iter().filter(|(_, v)| !v.is_empty()) {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
        .map_err(Box::new)
}

/// The value of metric `name` whose labels include every pair in `labels` (0 if absent).
pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    for mf in registry.gather() {
        if mf.name() != name {
            continue;
        }
        for m in mf.get_metric() {
            let ok = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if ok {
                if mf.get_field_type() == prometheus::proto::MetricType::COUNTER {
                    return m.get_counter().get_value();
                }
                return m.get_gauge().get_value();
            }
        }
    }
    0.0
}

/// Status and JSON body of a refused WebSocket dial to `path`.
pub fn ws_refusal<T>(
    path: &str,
    dial: Result<T, Box<tungstenite::Error>>,
) -> (u16, serde_json::Value) {
    match dial {
        Ok(_) => panic!("websocket to {path} unexpectedly succeeded"),
        Err(e) => match *e {
            tungstenite::Error::Http(resp) => {
                let body = resp.body().clone().unwrap_or_default();
                (
                    resp.status().as_u16(),
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
                )
            }
            other => panic!("unexpected error {other}"),
        },
    }
}
