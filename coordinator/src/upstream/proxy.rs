//! The reverse proxy: every request tailnetd does not route itself goes to the upstream coderd.
//!
//! Why: clients and agents keep one base URL; only the coordination endpoints and the relay
//! differ. A request is forwarded with its method, path, query, headers (minus hop-by-hop ones;
//! forwarding headers set from what tailnetd saw, client-sent ones kept only from
//! `trusted_proxies`, see [`set_forwarding_headers`]) and a streaming body; the answer streams back the same way.
//! WebSocket (and any other HTTP/1.1) upgrades are forwarded, and on the upstream's `101` the two
//! upgraded connections are spliced byte for byte. Failures are answered in Coder's JSON error
//! shape (the detail names the kind of failure; the error chain goes to the log only): `502` when
//! the upstream cannot be reached or does not send headers in time, `413` when
//! a request body exceeds the limit (checked against `Content-Length` at once and counted while
//! streaming otherwise).
//!
//! The binary may tell the proxy which scheme the client used by inserting a [`ClientScheme`]
//! request extension (default `http`), and should serve the router with
//! `into_make_service_with_connect_info::<SocketAddr>()` so `X-Forwarded-For` gets the peer
//! address.
//!
//! This module must never buffer a whole body (only a bounded DERP-map answer being rewritten),
//! never wait on the upstream without a deadline, and never log headers (they carry tokens).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use http_body_util::Limited;
use hyper_util::rt::TokioIo;

use super::rewrite::{derp_field_for, replace_member};
use super::{Upstream, UpstreamError};
use crate::api::ApiError;
use crate::Coordinator;

/// The scheme the client used to reach tailnetd (`http` or `https`), as a request extension set
/// by the binary; used for `X-Forwarded-Proto` when the request does not carry one already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientScheme(pub &'static str);

/// Message of the 502 answer.
pub const UPSTREAM_UNREACHABLE_MESSAGE: &str = "Failed to reach the upstream Coder server.";
/// Message of the 413 answer.
pub const BODY_TOO_LARGE_MESSAGE: &str = "Request body is too large.";

#[derive(Clone)]
struct ProxyState {
    up: Upstream,
    coord: Arc<Coordinator>,
}

/// A router whose fallback proxies everything to `up`.
pub(crate) fn router(up: Upstream, coord: Arc<Coordinator>) -> Router {
    Router::new()
        .fallback(proxy)
        .with_state(ProxyState { up, coord })
}

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1, plus the legacy ones).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Remove hop-by-hop headers, including every header named in `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// Whether the request asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
fn wants_upgrade(h: &HeaderMap) -> Option<HeaderValue> {
    let conn_upgrade = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !conn_upgrade {
        return None;
    }
    h.get(header::UPGRADE).cloned()
}

/// Client-sent forwarding headers that only a proxy may set.
const FORWARDING_HEADERS: [&str; 5] = [
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "true-client-ip",
    "forwarded",
];

/// Sets the forwarding headers from what tailnetd saw. From a peer in `trusted` (the load
/// balancer in front), the client-sent ones are kept and `X-Forwarded-For` is extended; from any
/// other peer, `X-Forwarded-Host`/`-Proto`, `X-Real-IP`, `True-Client-IP` and `Forwarded` are
/// dropped and `X-Forwarded-For` is the peer alone. Then the missing ones are set: the client's
/// `Host`, the scheme it used, its address.
fn set_forwarding_headers(
    headers: &mut HeaderMap,
    peer: Option<std::net::IpAddr>,
    orig_host: Option<&HeaderValue>,
    scheme: &'static str,
    trusted: &[std::net::IpAddr],
) {
    let from_trusted_proxy = peer.is_some_and(|ip| trusted.contains(&ip));
    if !from_trusted_proxy {
        for name in FORWARDING_HEADERS {
            headers.remove(name);
        }
        headers.remove("x-forwarded-for");
    }
    if let Some(ip) = peer {
        let prior: Vec<String> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        let value = if prior.is_empty() {
            ip.to_string()
        } else {
            format!("{}, {ip}", prior.join(", "))
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert("x-forwarded-for", v);
        }
        if !headers.contains_key("x-real-ip") {
            if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
                headers.insert("x-real-ip", v);
            }
        }
    }
    if !headers.contains_key("x-forwarded-host") {
        if let Some(h) = orig_host {
            headers.insert("x-forwarded-host", h.clone());
        }
    }
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static(scheme));
    }
}

fn error_response(up: &Upstream, e: &UpstreamError) -> Response {
    let m = up.metrics();
    match e {
        UpstreamError::BodyTooLarge(limit) => {
            m.proxy_error("body_too_large");
            too_large(*limit)
        }
        UpstreamError::Timeout(d) => {
            m.proxy_error("timeout");
            tracing::warn!(timeout = ?d, "upstream did not answer in time");
            ApiError::new(StatusCode::BAD_GATEWAY, UPSTREAM_UNREACHABLE_MESSAGE)
                .detail(format!("The upstream did not answer within {d:?}."))
                .into_response()
        }
        other => {
            m.proxy_error("unreachable");
            tracing::warn!(error = %other, "upstream request failed");
            ApiError::new(StatusCode::BAD_GATEWAY, UPSTREAM_UNREACHABLE_MESSAGE)
                .detail(public_detail(other))
                .into_response()
        }
    }
}

/// What failed, for an unauthenticated caller: the kind of failure, never the error chain (OS
/// errors, internal addresses), which is logged instead.
fn public_detail(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Connect { .. } => "Connecting to the upstream failed.",
        UpstreamError::Tls { .. } => "The TLS handshake with the upstream failed.",
        UpstreamError::Timeout(_) | UpstreamError::DialTimeout(_) => {
            "The upstream did not answer in time."
        }
        UpstreamError::Unexpected(_) | UpstreamError::Status { .. } => {
            "The upstream answered unexpectedly."
        }
        _ => "The request to the upstream failed.",
    }
}

fn too_large(limit: u64) -> Response {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, BODY_TOO_LARGE_MESSAGE)
        .detail(format!(
            "The request body exceeds the limit of {limit} bytes."
        ))
        .into_response()
}

async fn proxy(State(st): State<ProxyState>, mut req: Request) -> Response {
    let up = &st.up;
    let cfg = up.config();
    let limit = cfg.max_body_bytes;

    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        up.metrics().proxy_error("body_too_large");
        tracing::debug!(limit, "request body over the limit; answered 413");
        return too_large(limit);
    }

    let upgrade = wants_upgrade(req.headers());
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let rewrite_field = if cfg.rewrite_derp_map {
        derp_field_for(req.method(), req.uri().path())
    } else {
        None
    };
    let uri = match up.uri_for(&path_and_query) {
        Ok(u) => u,
        Err(e) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "Invalid request URI.")
                .detail(e.to_string())
                .into_response()
        }
    };
    let client_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let scheme = req
        .extensions()
        .get::<ClientScheme>()
        .map(|s| s.0)
        .unwrap_or("http");

    let (mut parts, body) = req.into_parts();
    let orig_host = parts.headers.get(header::HOST).cloned();
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    if let Some(u) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u.clone());
    }
    match (&orig_host, cfg.preserve_host) {
        (Some(h), true) => {
            headers.insert(header::HOST, h.clone());
        }
        _ => {
            if let Ok(v) = HeaderValue::from_str(up.authority().as_str()) {
                headers.insert(header::HOST, v);
            }
        }
    }
    set_forwarding_headers(
        &mut headers,
        client_ip,
        orig_host.as_ref(),
        scheme,
        &cfg.trusted_proxies,
    );
    if rewrite_field.is_some() {
        // The body must arrive uncompressed to be rewritten.
        headers.remove(header::ACCEPT_ENCODING);
    }

    let mut out = http::Request::new(Body::new(Limited::new(
        body,
        usize::try_from(limit).unwrap_or(usize::MAX),
    )));
    *out.method_mut() = parts.method.clone();
    *out.uri_mut() = uri;
    *out.headers_mut() = headers;

    let kind = if upgrade.is_some() {
        "upgrade"
    } else {
        "proxy"
    };
    let mut resp = match up.send(kind, out).await {
        Ok(r) => r,
        Err(e) => return error_response(up, &e),
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            // The upstream switched protocols we never asked for.
            up.metrics().proxy_error("upgrade");
            return ApiError::new(StatusCode::BAD_GATEWAY, UPSTREAM_UNREACHABLE_MESSAGE)
                .detail("The upstream switched protocols without an upgrade request.")
                .into_response();
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (parts, _) = resp.into_parts();
        splice(st.clone(), client_upgrade, upstream_upgrade);
        return Response::from_parts(parts, Body::empty());
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    match rewrite_field {
        Some(field) if parts.status == StatusCode::OK && is_plain_json(&parts.headers) => {
            rewrite(&st, parts, body, field).await
        }
        _ => Response::from_parts(parts, Body::new(body)),
    }
}

fn is_plain_json(h: &HeaderMap) -> bool {
    let json = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    let encoded = h
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
    json && !encoded
}

/// Read at most `max_rewrite_bytes` of a DERP-map-carrying answer and replace the map; larger or
/// non-object answers pass through unchanged (counted).
async fn rewrite(
    st: &ProxyState,
    mut parts: http::response::Parts,
    body: hyper::body::Incoming,
    field: &'static str,
) -> Response {
    let up = &st.up;
    let m = up.metrics();
    let limit = up.config().max_rewrite_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        m.rewrite("too_large");
        return Response::from_parts(parts, Body::new(body));
    }
    let mut body = Body::new(body).into_data_stream();
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + up.config().header_timeout;
    loop {
        let next = match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(n) => n,
            Err(_) => {
                m.proxy_error("timeout");
                return ApiError::new(StatusCode::BAD_GATEWAY, UPSTREAM_UNREACHABLE_MESSAGE)
                    .detail("The upstream did not finish its answer in time.")
                    .into_response();
            }
        };
        match next {
            None => break,
            Some(Ok(chunk)) => {
                buf.extend_from_slice(&chunk);
                if buf.len() > limit {
                    m.rewrite("too_large");
                    let prefix = buf.freeze();
                    let stream =
                        futures_util::stream::once(async move { Ok::<Bytes, axum::Error>(prefix) })
                            .chain(body);
                    return Response::from_parts(parts, Body::from_stream(stream));
                }
            }
            Some(Err(e)) => {
                m.proxy_error("unreachable");
                tracing::warn!(error = %e, "reading the upstream answer failed");
                return ApiError::new(StatusCode::BAD_GATEWAY, UPSTREAM_UNREACHABLE_MESSAGE)
                    .detail("Reading the upstream answer failed.")
                    .into_response();
            }
        }
    }
    let original = buf.freeze();
    let map = st.coord.derp_map();
    let json = String::from_utf8_lossy(&map.json);
    let new_body = match replace_member(&original, field, &json) {
        Ok(b) => {
            m.rewrite("rewritten");
            Bytes::from(b)
        }
        Err(super::rewrite::RewriteError::NoField(_)) => {
            m.rewrite("no_field");
            original
        }
        Err(e) => {
            m.rewrite("not_json");
            tracing::debug!(error = %e, "upstream DERP map answer not rewritten");
            original
        }
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(new_body.len()));
    Response::from_parts(parts, Body::from(new_body))
}

/// Wait for both sides' upgrades and copy bytes both ways until either side ends (or the
/// coordinator shuts down).
fn splice(st: ProxyState, client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let wait = st.up.config().header_timeout;
    tokio::spawn(async move {
        let m = st.up.metrics().clone();
        let both = async { tokio::try_join!(client, upstream) };
        let (c, u) = match tokio::time::timeout(wait, both).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                m.proxy_error("upgrade");
                tracing::debug!(error = %e, "proxied upgrade failed");
                return;
            }
            Err(_) => {
                m.proxy_error("upgrade");
                tracing::debug!("proxied upgrade did not complete in time");
                return;
            }
        };
        m.spliced.inc();
        let mut c = TokioIo::new(c);
        let mut u = TokioIo::new(u);
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut c, &mut u) => {
                if let Err(e) = r {
                    m.proxy_error("splice");
                    tracing::debug!(error = %e, "spliced connection ended with an error");
                }
            }
            _ = st.coord.cancel.cancelled() => {}
        }
        m.spliced.dec();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, X-Secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("coder-session-token", "t".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("coder-session-token"));
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", "websocket".parse().unwrap());
        assert!(wants_upgrade(&h).is_none());
        h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        assert_eq!(wants_upgrade(&h).unwrap(), "websocket");
    }

    /// Issue 14, finding 6: a 502 tells an anonymous caller what failed, in Coder's JSON shape,
    /// without the internal error chain (that stays in the log).
    #[tokio::test]
    async fn unreachable_upstream_body_has_no_error_chain() {
        let registry = prometheus::Registry::new();
        let up = Upstream::new(
            super::super::UpstreamConfig {
                url: "http://127.0.0.1:9".into(),
                ..Default::default()
            },
            &registry,
        )
        .unwrap();
        for e in [
            UpstreamError::Request(
                "client error (Connect): tcp connect error: Connection refused (os error 111)"
                    .into(),
            ),
            UpstreamError::Connect {
                addr: "10.1.2.3:3000".into(),
                reason: "Connection refused (os error 111)".into(),
            },
        ] {
            let resp = error_response(&up, &e);
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["message"], UPSTREAM_UNREACHABLE_MESSAGE);
            let text = String::from_utf8_lossy(&body);
            for leak in ["os error", "refused", "tcp connect", "10.1.2.3"] {
                assert!(!text.contains(leak), "{leak:?} in {text}");
            }
            assert!(!json["detail"].as_str().unwrap_or("").is_empty());
        }
    }

    fn forwarded(client: &[(&str, &str)], peer: &str, trusted: &[std::net::IpAddr]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in client {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let host = HeaderValue::from_static("coder.example.com");
        set_forwarding_headers(
            &mut h,
            Some(peer.parse().unwrap()),
            Some(&host),
            "https",
            trusted,
        );
        h
    }

    /// Issue 14, finding 4: client-sent forwarding headers are replaced by what tailnetd saw,
    /// unless the peer is a trusted proxy; X-Forwarded-For gets the peer appended.
    #[test]
    fn forwarding_headers_come_from_what_tailnetd_saw() {
        let spoofed = [
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "http"),
            ("x-real-ip", "1.2.3.4"),
            ("true-client-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4;proto=http"),
            ("x-forwarded-for", "1.2.3.4"),
        ];
        let h = forwarded(&spoofed, "127.0.0.2", &[]);
        assert_eq!(h["x-forwarded-host"], "coder.example.com");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-real-ip"], "127.0.0.2");
        assert!(h.get("true-client-ip").is_none());
        assert!(h.get("forwarded").is_none());
        assert_eq!(h["x-forwarded-for"], "127.0.0.2");

        let lb: std::net::IpAddr = "127.0.0.3".parse().unwrap();
        let h = forwarded(&spoofed, "127.0.0.3", &[lb]);
        assert_eq!(h["x-forwarded-host"], "evil.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-real-ip"], "1.2.3.4");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 127.0.0.3");
    }
}
