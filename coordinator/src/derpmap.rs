//! Where the DERP map comes from, and how changes reach every subscriber.
//!
//! Why: agents and clients learn relay regions from the coordinator (`StreamDERPMaps`, the legacy
//! `/api/v2/derp-map` WebSocket). The map is built like coderd's `NewDERPMap`: regions from a JSON
//! file (Tailscale/Coder form) and/or configuration, this process's own relay as the embedded
//! region, and one STUN-only region per configured STUN server. The file is polled; a change is
//! published through a `tokio::sync::watch` channel as a pre-encoded [`DerpMapSnapshot`] (JSON with
//! Go's trailing newline, and protobuf), so fan-out never re-encodes per subscriber.
//!
//! This module must never replace a good map with a broken one: a file that fails to parse or
//! conflicts with the configured regions keeps the old map and is logged.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use proto::derpmap::{same_map, DerpMap, DerpMapError, DerpNode, DerpRegion};
use proto::tailnet::v2;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Coder's default embedded region id.
pub const DEFAULT_REGION_ID: i64 = 999;
/// Coder's default embedded region code.
pub const DEFAULT_REGION_CODE: &str = "coder";
/// Coder's default embedded region name.
pub const DEFAULT_REGION_NAME: &str = "Coder Embedded Relay";

/// This process's own relay, added as the embedded region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedRelay {
    /// Region id (Coder default 999).
    pub region_id: i64,
    /// Region code (Coder default `coder`).
    pub region_code: String,
    /// Region name (Coder default `Coder Embedded Relay`).
    pub region_name: String,
    /// Public URL clients reach the relay at (`http://host:port` or `https://host[:port]`).
    pub public_url: String,
    /// UDP port of this process's STUN listener; `None` writes `STUNPort: -1` (disabled).
    pub stun_port: Option<u16>,
}

impl EmbeddedRelay {
    /// Coder's defaults for region id, code and name.
    pub fn new(public_url: impl Into<String>, stun_port: Option<u16>) -> Self {
        Self {
            region_id: DEFAULT_REGION_ID,
            region_code: DEFAULT_REGION_CODE.into(),
            region_name: DEFAULT_REGION_NAME.into(),
            public_url: public_url.into(),
            stun_port,
        }
    }
}

/// How to build the map.
#[derive(Debug, Clone)]
pub struct DerpMapConfig {
    /// A JSON DERP map file (Tailscale/Coder form); polled for changes.
    pub file: Option<PathBuf>,
    /// Regions from the configuration (merged with the file's; ids must not collide).
    pub regions: Vec<DerpRegion>,
    /// This process's relay.
    pub embedded: Option<EmbeddedRelay>,
    /// External STUN servers (`host:port`), each becoming a STUN-only region numbered after the
    /// embedded region (`region_id + index + 1`).
    pub stun_servers: Vec<String>,
    /// How often the file's modification time is checked.
    pub poll_interval: Duration,
}

impl Default for DerpMapConfig {
    fn default() -> Self {
        Self {
            file: None,
            regions: Vec::new(),
            embedded: None,
            stun_servers: Vec::new(),
            poll_interval: Duration::from_secs(2),
        }
    }
}

/// Why a map could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DerpMapSourceError {
    /// The file could not be read.
    #[error("reading DERP map file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a DERP map.
    #[error("parsing DERP map file {path}: {source}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// The parse error.
        source: DerpMapError,
    },
    /// Two sources define the same region id.
    #[error("DERP region {0} is defined twice")]
    Conflict(i64),
    /// The public URL is not `http(s)://host[:port]`.
    #[error("invalid relay public URL {0:?}")]
    PublicUrl(String),
    /// A STUN server address is not `host:port`.
    #[error("invalid STUN server address {0:?}")]
    StunAddress(String),
    /// The map cannot be encoded (e.g. a port out of range).
    #[error("encoding DERP map: {0}")]
    Encode(DerpMapError),
}

/// One version of the map, encoded once for every subscriber.
#[derive(Debug, Clone)]
pub struct DerpMapSnapshot {
    /// The map.
    pub map: DerpMap,
    /// The protobuf form (`home_params` always set) for `StreamDERPMaps`.
    pub proto: v2::DerpMap,
    /// Go `json.Encoder` output (with the trailing newline) for `/api/v2/derp-map`.
    pub json: Bytes,
}

impl DerpMapSnapshot {
    /// Encode `map` in both forms.
    pub fn new(map: DerpMap) -> Result<Self, DerpMapSourceError> {
        let proto = map.to_proto().map_err(DerpMapSourceError::Encode)?;
        let mut json = map.to_json().map_err(DerpMapSourceError::Encode)?;
        json.push(b'\n');
        Ok(Self {
            map,
            proto,
            json: Bytes::from(json),
        })
    }
}

/// The current DERP map plus its change notifications. Cheap to clone (shares one channel).
///
/// What is published is the *base* map (configuration, file, embedded relay) with every region
/// that [`crate::relay_health`] found failing or draining marked `Avoid`; the two are kept apart
/// so that a restored region gets back exactly what its base says.
#[derive(Debug, Clone)]
pub struct DerpMapSource {
    config: Arc<DerpMapConfig>,
    tx: Arc<watch::Sender<Arc<DerpMapSnapshot>>>,
    /// The map before health overlays, and the regions marked `Avoid` by health (one lock for
    /// both, never held across an await, so an overlay and a base change cannot interleave).
    state: Arc<Mutex<Overlay>>,
    /// The file's stamp taken before the initial read, so a change made between construction
    /// and the start of [`DerpMapSource::watch_file`] is not missed.
    initial_stamp: Option<(SystemTime, u64)>,
}

impl DerpMapSource {
    /// Build the initial map. A configured file must exist and parse at startup.
    pub fn new(config: DerpMapConfig) -> Result<Self, DerpMapSourceError> {
        let initial_stamp = config.file.as_ref().and_then(|p| {
            let md = std::fs::metadata(p).ok()?;
            Some((md.modified().ok()?, md.len()))
        });
        let file_map = match &config.file {
            Some(path) => Some(read_file(path)?),
            None => None,
        };
        let map = build(&config, file_map)?;
        let snapshot = DerpMapSnapshot::new(map)?;
        if !has_derp_node(&snapshot.map) {
            tracing::warn!(
                "the DERP map has no DERP (non-STUN) node: peers can only connect directly"
            );
        }
        let state = Overlay::new(snapshot.map.clone());
        let (tx, _) = watch::channel(Arc::new(snapshot));
        Ok(Self {
            config: Arc::new(config),
            tx: Arc::new(tx),
            state: Arc::new(Mutex::new(state)),
            initial_stamp,
        })
    }

    /// A fixed map (no file, no embedded relay); [`DerpMapSource::set`] can still change it.
    pub fn fixed(map: DerpMap) -> Result<Self, DerpMapSourceError> {
        let state = Overlay::new(map.clone());
        let (tx, _) = watch::channel(Arc::new(DerpMapSnapshot::new(map)?));
        Ok(Self {
            config: Arc::new(DerpMapConfig::default()),
            tx: Arc::new(tx),
            state: Arc::new(Mutex::new(state)),
            initial_stamp: None,
        })
    }

    /// The current map.
    pub fn current(&self) -> Arc<DerpMapSnapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees the current map and every later change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<DerpMapSnapshot>> {
        self.tx.subscribe()
    }

    /// Replace the base map. Returns false (and publishes nothing) if the published map stays
    /// equal to the current one by Coder's `CompareDERPMaps` rules.
    pub fn set(&self, map: DerpMap) -> Result<bool, DerpMapSourceError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let changed = self.publish(with_marks(&map, &state.avoided))?;
        state.base = map;
        Ok(changed)
    }

    /// The base map: what configuration and file say, before health overlays.
    pub fn base(&self) -> DerpMap {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .base
            .clone()
    }

    /// Marks `region` `Avoid` (or lifts the mark) on top of the base map and publishes the
    /// result to every subscriber. A region the base already avoids stays avoided. Returns
    /// whether the published map changed.
    pub fn set_region_avoided(
        &self,
        region: i64,
        avoided: bool,
    ) -> Result<bool, DerpMapSourceError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = state.avoided.clone();
        if avoided {
            next.insert(region);
        } else {
            next.remove(&region);
        }
        let changed = self.publish(with_marks(&state.base, &next))?;
        state.avoided = next;
        Ok(changed)
    }

    /// The regions health has marked `Avoid`.
    pub fn avoided_regions(&self) -> BTreeSet<i64> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .avoided
            .clone()
    }

    fn publish(&self, map: DerpMap) -> Result<bool, DerpMapSourceError> {
        let snapshot = DerpMapSnapshot::new(map)?;
        let mut changed = false;
        self.tx.send_if_modified(|cur| {
            if same_map(&cur.map, &snapshot.map) {
                return false;
            }
            *cur = Arc::new(snapshot);
            changed = true;
            true
        });
        Ok(changed)
    }

    /// Re-read the file and publish the result if it changed. On error the old map stays.
    pub fn reload(&self) -> Result<bool, DerpMapSourceError> {
        let Some(path) = &self.config.file else {
            return Ok(false);
        };
        let file_map = read_file(path)?;
        self.set(build(&self.config, Some(file_map))?)
    }

    /// Poll the file until `cancel` fires, calling `on_change` after each published change.
    /// Returns at once if there is no file.
    pub async fn watch_file(&self, cancel: CancellationToken, on_change: impl Fn() + Send) {
        let Some(path) = self.config.file.clone() else {
            return;
        };
        let mut last = self.initial_stamp;
        let mut tick =
            tokio::time::interval(self.config.poll_interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let stamp = file_stamp(&path).await;
            // Filesystems with coarse timestamps can hide a second write within the same tick:
            // while the file is freshly modified, re-read it even if the stamp looks unchanged.
            let fresh = stamp.is_some_and(|(m, _)| {
                SystemTime::now()
                    .duration_since(m)
                    .map_or(true, |age| age < FRESH_WINDOW)
            });
            let touched = stamp != last;
            if !touched && !fresh {
                continue;
            }
            last = stamp;
            let source = self.clone();
            // Parsing is CPU work on a small file; keep it off the async workers anyway.
            let res = tokio::task::spawn_blocking(move || source.reload()).await;
            match res {
                Ok(Ok(true)) => {
                    tracing::info!(path = %path.display(), "DERP map file changed; published the new map");
                    on_change();
                }
                Ok(Ok(false)) => {
                    tracing::debug!(path = %path.display(), "DERP map file touched; map unchanged");
                }
                Ok(Err(e)) if touched => {
                    tracing::warn!(error = %e, "DERP map file is broken; keeping the previous map");
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "DERP map file still broken; keeping the previous map");
                }
                Err(e) => tracing::warn!(error = %e, "DERP map reload task failed"),
            }
        }
    }
}

/// The base map and the health marks laid over it.
#[derive(Debug)]
struct Overlay {
    base: DerpMap,
    avoided: BTreeSet<i64>,
}

impl Overlay {
    fn new(base: DerpMap) -> Self {
        Self {
            base,
            avoided: BTreeSet::new(),
        }
    }
}

/// `base` with every region in `avoided` (that exists there) marked `Avoid`.
fn with_marks(base: &DerpMap, avoided: &BTreeSet<i64>) -> DerpMap {
    let mut map = base.clone();
    for id in avoided {
        if let Some(r) = map.regions.get_mut(id) {
            r.avoid = true;
        }
    }
    map
}

/// How long after a modification the file is re-read on every poll.
const FRESH_WINDOW: Duration = Duration::from_secs(3);

/// Modification time and length: a change in either triggers a reload.
async fn file_stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let md = tokio::fs::metadata(path).await.ok()?;
    Some((md.modified().ok()?, md.len()))
}

fn read_file(path: &PathBuf) -> Result<DerpMap, DerpMapSourceError> {
    let data = std::fs::read(path).map_err(|source| DerpMapSourceError::Read {
        path: path.clone(),
        source,
    })?;
    DerpMap::from_json(&data).map_err(|source| DerpMapSourceError::Parse {
        path: path.clone(),
        source,
    })
}

fn has_derp_node(map: &DerpMap) -> bool {
    map.regions
        .values()
        .any(|r| r.nodes.iter().any(|n| !n.stun_only))
}

fn insert(map: &mut DerpMap, region: DerpRegion) -> Result<(), DerpMapSourceError> {
    let id = region.region_id;
    if map.regions.insert(id, region).is_some() {
        return Err(DerpMapSourceError::Conflict(id));
    }
    Ok(())
}

/// Coder's `NewDERPMap`: file regions + config regions + embedded region + STUN regions.
fn build(config: &DerpMapConfig, file: Option<DerpMap>) -> Result<DerpMap, DerpMapSourceError> {
    let mut map = DerpMap::default();
    if let Some(f) = file {
        map.home_params = f.home_params;
        map.omit_default_regions = f.omit_default_regions;
        for (id, mut r) in f.regions {
            // Tailscale's map is keyed by id; trust the key if the body omits it.
            if r.region_id == 0 {
                r.region_id = id;
            }
            insert(&mut map, r)?;
        }
    }
    for r in &config.regions {
        insert(&mut map, r.clone())?;
    }
    if let Some(e) = &config.embedded {
        let (https, host, port) = parse_public_url(&e.public_url)?;
        insert(
            &mut map,
            DerpRegion {
                embedded_relay: true,
                region_id: e.region_id,
                region_code: e.region_code.clone(),
                region_name: e.region_name.clone(),
                nodes: vec![DerpNode {
                    name: format!("{}b", e.region_id),
                    region_id: e.region_id,
                    host_name: host,
                    derp_port: i64::from(port),
                    stun_port: e.stun_port.map(i64::from).unwrap_or(-1),
                    force_http: !https,
                    ..Default::default()
                }],
                ..Default::default()
            },
        )?;
    }
    let base = config
        .embedded
        .as_ref()
        .map(|e| e.region_id)
        .unwrap_or(DEFAULT_REGION_ID);
    for (i, addr) in config.stun_servers.iter().enumerate() {
        let (host, port) =
            split_host_port(addr).ok_or_else(|| DerpMapSourceError::StunAddress(addr.clone()))?;
        let id = base + i as i64 + 1;
        insert(
            &mut map,
            DerpRegion {
                region_id: id,
                region_code: format!("coder_stun_{id}"),
                region_name: format!("Coder STUN {id}"),
                nodes: vec![DerpNode {
                    name: format!("{id}stun0"),
                    region_id: id,
                    host_name: host,
                    stun_only: true,
                    stun_port: i64::from(port),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )?;
    }
    Ok(map)
}

/// `host:port` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', ' ']) {
        return None;
    }
    Some((host.to_string(), port))
}

/// `(is_https, host, port)` from `http(s)://host[:port][/...]`.
fn parse_public_url(url: &str) -> Result<(bool, String, u16), DerpMapSourceError> {
    let bad = || DerpMapSourceError::PublicUrl(url.to_string());
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "https" => true,
        "http" => false,
        _ => return Err(bad()),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let default_port = if https { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6.split_once(']').ok_or_else(bad)?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if tail.is_empty() => default_port,
            None => return Err(bad()),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((https, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_public_url("http://127.0.0.1:8080").unwrap(),
            (false, "127.0.0.1".into(), 8080)
        );
        assert_eq!(
            parse_public_url("https://coder.example.com/path").unwrap(),
            (true, "coder.example.com".into(), 443)
        );
        assert_eq!(
            parse_public_url("http://[::1]:3000/").unwrap(),
            (false, "::1".into(), 3000)
        );
        assert!(parse_public_url("ftp://x").is_err());
        assert!(parse_public_url("http://:80").is_err());
        assert!(parse_public_url("http://x:notaport").is_err());
        assert_eq!(split_host_port("[::1]:3478"), Some(("::1".into(), 3478)));
        assert_eq!(split_host_port("stun.l.google.com:19302").unwrap().1, 19302);
        assert_eq!(split_host_port("nope"), None);
    }

    #[test]
    fn coder_layout() {
        let src = DerpMapSource::new(DerpMapConfig {
            embedded: Some(EmbeddedRelay::new("http://127.0.0.1:3000", Some(3478))),
            stun_servers: vec!["stun.l.google.com:19302".into(), "[::1]:3479".into()],
            ..Default::default()
        })
        .unwrap();
        let snap = src.current();
        let r = &snap.map.regions[&999];
        assert!(r.embedded_relay);
        assert_eq!(
            (r.region_code.as_str(), r.region_name.as_str()),
            ("coder", "Coder Embedded Relay")
        );
        let n = &r.nodes[0];
        assert_eq!(
            (
                n.name.as_str(),
                n.host_name.as_str(),
                n.derp_port,
                n.stun_port,
                n.force_http
            ),
            ("999b", "127.0.0.1", 3000, 3478, true)
        );
        let s = &snap.map.regions[&1000];
        assert_eq!(s.region_code, "coder_stun_1000");
        assert_eq!(s.region_name, "Coder STUN 1000");
        assert_eq!(s.nodes[0].name, "1000stun0");
        assert!(s.nodes[0].stun_only);
        assert_eq!(snap.map.regions[&1001].nodes[0].host_name, "::1");
        assert!(snap.json.ends_with(b"}\n"));
        assert!(snap.proto.home_params.is_some());
        let https = DerpMapSource::new(DerpMapConfig {
            embedded: Some(EmbeddedRelay::new("https://c.example", None)),
            ..Default::default()
        })
        .unwrap();
        let n = &https.current().map.regions[&999].nodes[0];
        assert_eq!((n.derp_port, n.stun_port, n.force_http), (443, -1, false));
    }

    #[test]
    fn conflicts_and_set() {
        let region = DerpRegion {
            region_id: 999,
            region_code: "x".into(),
            ..Default::default()
        };
        let err = DerpMapSource::new(DerpMapConfig {
            regions: vec![region.clone()],
            embedded: Some(EmbeddedRelay::new("http://h:1", None)),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, DerpMapSourceError::Conflict(999)));
        let src = DerpMapSource::fixed(DerpMap::default()).unwrap();
        let mut rx = src.subscribe();
        rx.borrow_and_update();
        let mut m = DerpMap::default();
        m.regions.insert(999, region);
        assert!(src.set(m.clone()).unwrap());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(!src.set(m).unwrap());
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn health_marks_overlay_the_base_map_and_reach_subscribers() {
        let src = DerpMapSource::new(DerpMapConfig {
            embedded: Some(EmbeddedRelay::new("http://127.0.0.1:3000", Some(3478))),
            ..Default::default()
        })
        .unwrap();
        let mut rx = src.subscribe();
        rx.borrow_and_update();
        assert!(src.set_region_avoided(DEFAULT_REGION_ID, true).unwrap());
        assert!(rx.has_changed().unwrap());
        let cur = rx.borrow_and_update().clone();
        assert!(cur.map.regions[&DEFAULT_REGION_ID].avoid);
        assert!(cur.proto.regions[&DEFAULT_REGION_ID].avoid);
        assert!(
            !src.base().regions[&DEFAULT_REGION_ID].avoid,
            "the base is untouched"
        );
        // Marking again changes nothing and publishes nothing.
        assert!(!src.set_region_avoided(DEFAULT_REGION_ID, true).unwrap());
        assert!(!rx.has_changed().unwrap());
        // A base change keeps the mark.
        let mut base = src.base();
        base.regions
            .get_mut(&DEFAULT_REGION_ID)
            .unwrap()
            .region_name = "renamed".into();
        assert!(src.set(base).unwrap());
        let cur = rx.borrow_and_update().clone();
        assert!(cur.map.regions[&DEFAULT_REGION_ID].avoid);
        assert_eq!(cur.map.regions[&DEFAULT_REGION_ID].region_name, "renamed");
        // Restored: exactly the base again.
        assert!(src.set_region_avoided(DEFAULT_REGION_ID, false).unwrap());
        let cur = rx.borrow_and_update().clone();
        assert!(!cur.map.regions[&DEFAULT_REGION_ID].avoid);
        assert!(src.avoided_regions().is_empty());
    }
}
