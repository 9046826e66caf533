//! One health probe of one DERP node, as the coordinator's region health needs it: `GET
//! /derp/probe` (which a draining tailnetd relay answers `503`), then a DERP round trip
//! (handshake, Ping, the matching Pong) with the prober's own key.
//!
//! Why both: the HTTP probe is what derper and tailnetd serve to anyone and the only place a
//! relay can say "draining" while it still serves; the round trip proves the relay relays (a
//! front end that answers HTTP while the DERP server behind it is gone fails it). A relay that
//! refuses the prober's key (admission: closed right after ClientInfo, before ServerInfo, as
//! derper refuses) has still shown its DERP server working, and counts as up: relays of a fleet
//! ask any coordinator replica about keys, and no replica knows another's prober key.

use std::time::Duration;

use proto::key::NodePrivate;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::dial::{connect, dial, Connected, DialOptions, DialTls};
use crate::client::{ClientError, ReceivedFrame};

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeHealth {
    /// `/derp/probe` answered 200 and a DERP Ping came back as its Pong.
    Up,
    /// `/derp/probe` answered 503: the relay is draining.
    Draining,
    /// Anything else; the text says what failed.
    Down(String),
}

/// Probes the relay at `url` (`http(s)://host:port/derp`), all within `timeout`.
pub async fn probe_node(
    url: &str,
    key: &NodePrivate,
    tls: &DialTls,
    timeout: Duration,
) -> NodeHealth {
    match tokio::time::timeout(timeout, probe_inner(url, key, tls, timeout)).await {
        Ok(h) => h,
        Err(_) => NodeHealth::Down(format!("no answer within {timeout:?}")),
    }
}

/// Longest `/derp/probe` response head read before giving up on it.
const MAX_PROBE_RESPONSE: usize = 4096;

async fn probe_inner(url: &str, key: &NodePrivate, tls: &DialTls, timeout: Duration) -> NodeHealth {
    // 1. GET /derp/probe.
    let (target, Connected { mut io, .. }) = match connect(url, None, tls).await {
        Ok(c) => c,
        Err(e) => return NodeHealth::Down(e.to_string()),
    };
    let request = format!(
        "GET /derp/probe HTTP/1.1\r\nHost: {}\r\nUser-Agent: tailnetd-relay-prober\r\nConnection: close\r\n\r\n",
        target.authority
    );
    if let Err(e) = io.write_all(request.as_bytes()).await {
        return NodeHealth::Down(format!("/derp/probe: {e}"));
    }
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match io.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return NodeHealth::Down(format!("/derp/probe: {e}")),
        }
        if head.len() > MAX_PROBE_RESPONSE {
            break;
        }
    }
    drop(io);
    let status = std::str::from_utf8(&head)
        .ok()
        .and_then(|t| t.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    match status {
        Some(200) => {}
        Some(503) => return NodeHealth::Draining,
        Some(code) => return NodeHealth::Down(format!("/derp/probe answered {code}")),
        None => return NodeHealth::Down("/derp/probe: no HTTP status".into()),
    }

    // 2. A DERP round trip.
    let mut opts = DialOptions::new(key.clone());
    opts.tls = tls.clone();
    opts.timeout = timeout;
    let mut dialed = match dial(url, opts).await {
        Ok(d) => d,
        Err(e) => return NodeHealth::Down(format!("DERP handshake: {e}")),
    };
    let mut ping = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut ping);
    if let Err(e) = dialed.client.ping(ping).await {
        return NodeHealth::Down(format!("DERP ping: {e}"));
    }
    // Bounded by the caller's timeout; a relay sends at most a handful of frames first.
    let mut server_info = false;
    loop {
        match dialed.client.recv().await {
            Ok(ReceivedFrame::Pong(p)) if p == ping => return NodeHealth::Up,
            Ok(ReceivedFrame::Restarting { .. }) => return NodeHealth::Draining,
            Ok(ReceivedFrame::ServerInfo(_)) => server_info = true,
            Ok(_) => {}
            // Closed right after our ClientInfo, before any ServerInfo: derper's way of refusing
            // a key its admission does not know. The relay sent its key and judged ours, so its
            // DERP server is up; the prober's key simply is not one it admits.
            Err(ClientError::Closed) if !server_info => return NodeHealth::Up,
            Err(e) => return NodeHealth::Down(format!("DERP round trip: {e}")),
        }
    }
}
