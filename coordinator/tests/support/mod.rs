//! Helpers shared by the in-process harness (`common`) and the sidecar harness
//! (`upstream_harness`): each test binary includes this module through its harness.

use tokio_tungstenite::tungstenite;

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
