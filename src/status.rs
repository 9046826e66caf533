//! The operator's status page, `/debug/` on the metrics/admin listener (`--metrics-addr`, which
//! is loopback by default and never the public listener): what this process holds right now.
//!
//! Why here: the page reads both the coordinator's peer graph and the relay, and only the binary
//! sees both (`derp` and `coordinator` never depend on each other). It is plain server-rendered
//! HTML that works without JavaScript and refreshes itself (`<meta http-equiv="refresh">`).
//!
//! Must never: put a peer-supplied string (peer names, mesh peer names, region names from a
//! DERP map file, close reasons) on the page unescaped ([`escape`]); hold a graph or relay lock
//! while rendering (the snapshots copy bounded rows, [`ROW_LIMIT`], and release their locks);
//! grow without bound (every table shows at most [`ROW_LIMIT`] rows and says how many exist).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coordinator::{Coordinator, DerpMapSource};
use derp::{DropCount, Server};

/// Rows per table; the page states the full count.
pub const ROW_LIMIT: usize = 1000;
/// Seconds between the page's own refreshes.
const REFRESH_SECONDS: u32 = 5;

/// HTML-escapes `s` for element text and double-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What the page reads: whichever of the coordinator, the relay and the DERP map this role runs.
pub struct StatusPage {
    pub role: &'static str,
    pub coordinator: Option<Arc<Coordinator>>,
    pub relay: Option<Arc<Server>>,
    pub derp_map: Option<DerpMapSource>,
    /// The drop counters at the previous render, for "drops since the last refresh".
    last_drops: Mutex<Option<(Instant, Vec<DropCount>)>>,
    started: Instant,
}

fn ago(d: Duration) -> String {
    let s = d.as_secs();
    if s < 1 {
        format!("{} ms", d.as_millis())
    } else if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s / 60)
    } else {
        format!("{} h", s / 3600)
    }
}

fn count_line(out: &mut String, shown: usize, total: usize, what: &str) {
    let _ = write!(out, "<p class=\"count\">{total} {what}");
    if shown < total {
        let _ = write!(out, " (first {shown} shown)");
    }
    out.push_str("</p>\n");
}

impl StatusPage {
    pub fn new(
        role: &'static str,
        coordinator: Option<Arc<Coordinator>>,
        relay: Option<Arc<Server>>,
        derp_map: Option<DerpMapSource>,
    ) -> Self {
        Self {
            role,
            coordinator,
            relay,
            derp_map,
            last_drops: Mutex::new(None),
            started: Instant::now(),
        }
    }

    /// The whole page.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let _ = write!(
            out,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
             <title>tailnetd status</title><style>\
             body{{font-family:sans-serif;margin:1em 2em;color:#222}}\
             table{{border-collapse:collapse;margin-bottom:1em}}\
             td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}}\
             th{{background:#eee}} .bad{{color:#b00;font-weight:bold}} .ok{{color:#070}}\
             code{{font-size:90%}}</style></head><body>\n\
             <h1>tailnetd status</h1>\n<p id=\"summary\">role <b>{}</b>, version {}, up {}; \
             refreshes every {REFRESH_SECONDS} s</p>\n",
            escape(self.role),
            escape(env!("CARGO_PKG_VERSION")),
            ago(self.started.elapsed()),
        );
        if let Some(m) = &self.derp_map {
            render_regions(&mut out, m);
        }
        if let Some(c) = &self.coordinator {
            self.render_peers(&mut out, c);
        }
        if let Some(r) = &self.relay {
            self.render_relay(&mut out, r);
        }
        out.push_str("</body></html>\n");
        out
    }

    fn render_peers(&self, out: &mut String, c: &Coordinator) {
        let g = c.graph().snapshot(ROW_LIMIT);
        out.push_str("<h2>Coordination peers</h2>\n");
        count_line(out, g.peers.len(), g.total_peers, "peers");
        out.push_str(
            "<table id=\"peers\"><tr><th>peer id</th><th>name</th><th>role</th>\
             <th>home region</th><th>last update</th><th>tunnels</th></tr>\n",
        );
        let mut peers = g.peers;
        peers.sort_by_key(|p| (p.role, p.id));
        for p in &peers {
            let _ = writeln!(
                out,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td></tr>",
                p.id,
                escape(&p.name),
                p.role,
                p.home_region.map_or("-".to_string(), |r| r.to_string()),
                p.last_update
                    .map_or("never".to_string(), |d| format!("{} ago", ago(d))),
                p.tunnels_out,
            );
        }
        out.push_str("</table>\n<h2>Tunnels</h2>\n");
        count_line(out, g.tunnels.len(), g.total_tunnels, "tunnels");
        out.push_str(
            "<table id=\"tunnels\"><tr><th>from</th><th>to</th><th>destination</th></tr>\n",
        );
        for t in &g.tunnels {
            let _ = writeln!(
                out,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
                t.src,
                t.dst,
                if t.dst_connected {
                    "connected"
                } else {
                    "absent"
                },
            );
        }
        out.push_str("</table>\n");
    }

    fn render_relay(&self, out: &mut String, r: &Server) {
        let s = r.snapshot(ROW_LIMIT);
        out.push_str("<h2>Relay clients</h2>\n");
        count_line(out, s.clients.len(), s.total_clients, "connections");
        out.push_str(
            "<table id=\"relay-clients\"><tr><th>node key</th><th>conn</th><th>remote</th>\
             <th>kind</th><th>home</th><th>connected</th><th>queued (disco/other/control)</th>\
             </tr>\n",
        );
        let mut clients = s.clients;
        clients.sort_by_key(|c| c.conn_id);
        for c in &clients {
            let mut kind = if c.mesh {
                "mesh peer".to_string()
            } else if c.prober {
                "prober".to_string()
            } else {
                "client".to_string()
            };
            if c.duplicate {
                kind.push_str(if c.active {
                    ", duplicate (active)"
                } else {
                    ", duplicate"
                });
            }
            if c.not_ideal {
                kind.push_str(", not ideal");
            }
            let _ = writeln!(
                out,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{} ago</td><td>{}/{}/{}</td></tr>",
                escape(&c.key.to_string()),
                c.conn_id,
                c.remote,
                kind,
                if c.preferred { "yes" } else { "no" },
                ago(c.connected_for),
                c.queue.disco,
                c.queue.regular,
                c.queue.control,
            );
        }
        out.push_str("</table>\n<h2>Mesh peers</h2>\n");
        if s.mesh_peers.is_empty() {
            out.push_str("<p id=\"mesh-none\">no outbound mesh links configured</p>\n");
        } else {
            out.push_str(
                "<table id=\"mesh\"><tr><th>peer</th><th>link</th><th>queued</th>\
                 <th>dropped</th></tr>\n",
            );
            for m in s.mesh_peers.iter().take(ROW_LIMIT) {
                let _ = writeln!(
                    out,
                    "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&m.name),
                    if m.connected { "ok" } else { "bad" },
                    if m.connected { "up" } else { "down" },
                    m.queued,
                    m.dropped,
                );
            }
            out.push_str("</table>\n");
        }
        self.render_drops(out, s.drops);
    }

    /// Drops by reason (disco and other packets): since start, and since the previous render of
    /// this page.
    fn render_drops(&self, out: &mut String, drops: Vec<DropCount>) {
        let now = Instant::now();
        let previous = {
            let mut last = self.last_drops.lock().unwrap_or_else(|p| p.into_inner());
            last.replace((now, drops.clone()))
        };
        out.push_str("<h2>Dropped packets</h2>\n");
        let window = previous
            .as_ref()
            .map_or("since the last refresh".to_string(), |(t, _)| {
                format!("since the last refresh ({} ago)", ago(now - *t))
            });
        let _ = writeln!(
            out,
            "<table id=\"drops\"><tr><th>reason</th><th>disco packets</th>\
             <th>other packets</th><th>bytes</th><th>packets {window}</th></tr>"
        );
        let mut reasons: Vec<derp::core::metrics::DropReason> = Vec::new();
        for d in &drops {
            if !reasons.contains(&d.reason) {
                reasons.push(d.reason);
            }
        }
        for reason in reasons {
            let of = |list: &[DropCount], disco: bool| -> (u64, u64) {
                list.iter()
                    .filter(|d| d.reason == reason && (d.kind.as_str() == "disco") == disco)
                    .fold((0, 0), |(p, b), d| (p + d.packets, b + d.bytes))
            };
            let (disco, disco_bytes) = of(&drops, true);
            let (other, other_bytes) = of(&drops, false);
            let recent = previous.as_ref().map(|(_, prev)| {
                (disco + other).saturating_sub(of(prev, true).0 + of(prev, false).0)
            });
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{disco}</td><td>{other}</td><td>{}</td><td{}>{}</td></tr>",
                reason.as_str(),
                disco_bytes + other_bytes,
                if recent.unwrap_or(0) > 0 {
                    " class=\"bad\""
                } else {
                    ""
                },
                recent.map_or("-".to_string(), |n| n.to_string()),
            );
        }
        out.push_str("</table>\n");
    }
}

fn render_regions(out: &mut String, m: &DerpMapSource) {
    let map = m.current();
    let avoided_by_health = m.avoided_regions();
    out.push_str("<h2>DERP map regions</h2>\n");
    count_line(
        out,
        map.map.regions.len().min(ROW_LIMIT),
        map.map.regions.len(),
        "regions",
    );
    out.push_str(
        "<table id=\"regions\"><tr><th>id</th><th>code</th><th>name</th><th>nodes</th>\
         <th>health</th></tr>\n",
    );
    for (id, r) in map.map.regions.iter().take(ROW_LIMIT) {
        let (class, health) = if avoided_by_health.contains(id) {
            ("bad", "avoided: failing probes or draining")
        } else if r.avoid {
            ("bad", "avoided (configured)")
        } else {
            ("ok", "healthy")
        };
        let nodes: Vec<String> = r
            .nodes
            .iter()
            .take(16)
            .map(|n| escape(&n.host_name))
            .collect();
        let _ = writeln!(
            out,
            "<tr><td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{class}\">{health}</td></tr>",
            escape(&r.region_code),
            escape(&r.region_name),
            nodes.join(", "),
        );
    }
    out.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_neutralises_markup_in_peer_strings() {
        let evil = "<script>alert('x')</script>\"&<img src=x onerror=alert(1)>";
        let e = escape(evil);
        assert_eq!(
            e,
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;&lt;img src=x \
             onerror=alert(1)&gt;"
        );
        assert!(!e.contains('<') && !e.contains('>') && !e.contains('"') && !e.contains('\''));
        // Plain text and non-ASCII pass through unchanged.
        assert_eq!(escape("ws-1 café"), "ws-1 café");
    }

    #[test]
    fn strings_from_the_derp_map_are_escaped_on_the_page() {
        let mut map = proto::derpmap::DerpMap::default();
        let region = proto::derpmap::DerpRegion {
            region_id: 7,
            region_code: "<script>alert(1)</script>".into(),
            region_name: "a\"b'c&d".into(),
            nodes: vec![proto::derpmap::DerpNode {
                name: "7a".into(),
                region_id: 7,
                host_name: "<img src=x onerror=alert(2)>".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        map.regions.insert(7, region);
        let source = DerpMapSource::fixed(map).unwrap();
        let page = StatusPage::new("coordinator", None, None, Some(source)).render();
        assert!(
            !page.contains("<script") && !page.contains("<img"),
            "{page}"
        );
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
        assert!(page.contains("a&quot;b&#39;c&amp;d"), "{page}");
        assert!(
            page.contains("&lt;img src=x onerror=alert(2)&gt;"),
            "{page}"
        );
        assert!(page.contains(">healthy<"), "{page}");
    }

    #[test]
    fn a_page_without_components_is_well_formed() {
        let page = StatusPage::new("derp", None, None, None).render();
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(!page.contains("<script"));
        assert!(page.trim_end().ends_with("</html>"));
    }
}
