//! Health-driven regions, end to end: a coordinator (`tailnetd dev`) probes a second relay
//! (`tailnetd derp`) that its DERP map names; a subscriber of `/api/v2/derp-map` sees the region
//! marked `Avoid` when the relay dies, restored when it is back, and marked again when the relay
//! is drained with SIGTERM, before it goes.

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{start, Running};

const REGION: i64 = 950;

fn start_relay(key: &std::path::Path, addr: &str) -> Running {
    start(&[
        "derp",
        "--key-file",
        key.to_str().unwrap(),
        "--http-addr",
        addr,
        "--stun-addr",
        "",
        "--drain-pause",
        "3s",
    ])
}

struct MapSubscriber {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
}

impl MapSubscriber {
    fn connect(addr: &str) -> Self {
        let (ws, _) = tungstenite::connect(format!("ws://{addr}/api/v2/derp-map")).unwrap();
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
        }
        Self { ws }
    }

    /// Reads maps until the region's `Avoid` is `want`, within `within`; returns the time taken.
    fn until_avoid(&mut self, want: bool, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < within,
                "region {REGION}: Avoid never became {want} within {within:?}"
            );
            let msg = match self.ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => panic!("derp-map subscriber: {e}"),
            };
            // Coder's wsjson writes each map as a binary message.
            let tungstenite::Message::Binary(data) = msg else {
                continue;
            };
            let map: serde_json::Value = serde_json::from_slice(&data).unwrap();
            let region = &map["Regions"][REGION.to_string()];
            assert!(region.is_object(), "region {REGION} missing from {map}");
            if region["Avoid"].as_bool().unwrap_or(false) == want {
                return start.elapsed();
            }
        }
    }
}

#[test]
fn a_failed_region_is_avoided_restored_and_a_draining_relay_is_avoided_before_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("relay.key");
    let relay = start_relay(&key, "127.0.0.1:0");
    let relay_addr = relay.line["http_addr"].as_str().unwrap().to_string();
    let port: u16 = relay_addr.rsplit(':').next().unwrap().parse().unwrap();

    let config = dir.path().join("dev.toml");
    std::fs::write(
        &config,
        format!(
            "[[derp_map.regions]]\nRegionID = {REGION}\nRegionCode = \"b\"\nRegionName = \"B\"\n\
             Nodes = [{{ Name = \"{REGION}a\", RegionID = {REGION}, HostName = \"127.0.0.1\", \
             DERPPort = {port}, ForceHTTP = true, STUNPort = -1 }}]\n"
        ),
    )
    .unwrap();
    let coordinator = start(&[
        "dev",
        "--config",
        config.to_str().unwrap(),
        "--http-addr",
        "127.0.0.1:0",
        "--stun-addr",
        "",
        "--derp-map-health-interval",
        "100ms",
        "--derp-map-health-timeout",
        "1s",
        "--derp-map-health-failures",
        "2",
        "--derp-map-health-successes",
        "2",
    ]);
    let addr = coordinator.line["http_addr"].as_str().unwrap().to_string();
    let mut sub = MapSubscriber::connect(&addr);
    sub.until_avoid(false, Duration::from_secs(5));

    // The relay dies without a word: avoided after two failed rounds.
    drop(relay);
    let took = sub.until_avoid(true, Duration::from_secs(10));
    eprintln!("killed relay: region avoided after {took:?}");

    // Back on the same port: restored after two good rounds.
    let mut relay = start_relay(&key, &relay_addr);
    let took = sub.until_avoid(false, Duration::from_secs(10));
    eprintln!("restarted relay: region restored after {took:?}");

    // SIGTERM: avoided while the relay still serves (its drain pause is 3 s).
    assert!(Command::new("kill")
        .args(["-TERM", &relay.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let took = sub.until_avoid(true, Duration::from_secs(3));
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay was gone before its region was marked ({took:?})"
    );
    eprintln!("draining relay: region avoided after {took:?}");
    drop(coordinator);
}
