//! Relay metrics with derper's names, registered in the caller's prometheus registry.
//!
//! Why this shape: the packet path must not touch a counter shared by all connections (one
//! cache line bouncing between cores at millions of updates per second). Per-packet counters are
//! therefore kept in per-thread shards ([`HotCounters`]: cache-line padded, one shard per worker
//! thread) and summed only when prometheus scrapes. Control-plane metrics (connections, dups,
//! handshake failures) are ordinary prometheus metrics because they move at connection rate.
//!
//! Must never: allocate, lock or log on the `add`/`drop` path; make a counter go backwards (the
//! shards only grow and the exported value is their sum).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Why a packet was dropped (derper's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    UnknownDest = 0,
    UnknownDestOnFwd = 1,
    GoneDisconnected = 2,
    QueueHead = 3,
    QueueTail = 4,
    WriteError = 5,
    DupClient = 6,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 7] = [
        DropReason::UnknownDest,
        DropReason::UnknownDestOnFwd,
        DropReason::GoneDisconnected,
        DropReason::QueueHead,
        DropReason::QueueTail,
        DropReason::WriteError,
        DropReason::DupClient,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownDest => "unknown_dest",
            DropReason::UnknownDestOnFwd => "unknown_dest_on_fwd",
            DropReason::GoneDisconnected => "gone_disconnected",
            DropReason::QueueHead => "queue_head",
            DropReason::QueueTail => "queue_tail",
            DropReason::WriteError => "write_error",
            DropReason::DupClient => "dup_client",
        }
    }
}

/// Packet kind label: disco (path discovery) or other (WireGuard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    Disco = 0,
    Other = 1,
}

impl PacketKind {
    pub const fn from_disco(disco: bool) -> Self {
        if disco {
            PacketKind::Disco
        } else {
            PacketKind::Other
        }
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            PacketKind::Disco => "disco",
            PacketKind::Other => "other",
        }
    }
}

/// Hot counters (sharded per thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hot {
    PacketsSent = 0,
    BytesSent,
    PacketsReceived,
    BytesReceived,
    PacketsForwardedIn,
    PacketsForwardedOut,
    GotPing,
    SentPong,
    PeerGoneDisconnectedFrames,
    PeerGoneNotHereFrames,
    UnknownFrames,
    WriteTimeouts,
}

const HOT_SCALARS: usize = 12;
const DROP_SERIES: usize = 14; // 7 reasons × 2 kinds
const HOT_SLOTS: usize = HOT_SCALARS + 2 * DROP_SERIES;

const SCALAR_NAMES: [(&str, &str); HOT_SCALARS] = [
    ("derp_packets_sent", "Packets written to clients."),
    (
        "derp_bytes_sent",
        "Packet payload bytes written to clients.",
    ),
    (
        "derp_packets_received",
        "SendPacket frames received from clients.",
    ),
    (
        "derp_bytes_received",
        "Packet payload bytes received from clients.",
    ),
    (
        "derp_packets_forwarded_in",
        "ForwardPacket frames received from mesh peers.",
    ),
    (
        "derp_packets_forwarded_out",
        "Packets handed to a mesh peer's forward queue (drops: derp_mesh_forward_dropped).",
    ),
    ("derp_got_ping", "Ping frames received."),
    ("derp_sent_pong", "Pong frames sent."),
    (
        "derp_peer_gone_disconnected_frames",
        "PeerGone(Disconnected) frames sent.",
    ),
    (
        "derp_peer_gone_not_here_frames",
        "PeerGone(NotHere) frames sent.",
    ),
    (
        "derp_unknown_frames",
        "Frames of unknown or ignored type skipped.",
    ),
    (
        "derp_sclient_write_timeouts",
        "Connections closed because writes stalled past the write timeout.",
    ),
];

#[repr(align(128))]
struct Shard([AtomicU64; HOT_SLOTS]);

impl Shard {
    fn new() -> Self {
        Shard(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static THREAD_SLOT: usize = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
}

/// Per-thread sharded counters, summed at scrape time.
pub(crate) struct HotCounters {
    shards: Box<[Shard]>,
    mask: usize,
    scalars: Vec<IntCounter>,
    dropped_packets: IntCounterVec,
    dropped_bytes: IntCounterVec,
    scrape: Mutex<()>,
}

impl std::fmt::Debug for HotCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotCounters")
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl HotCounters {
    fn new() -> prometheus::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        let n = (threads * 4).clamp(8, 256).next_power_of_two();
        let shards: Box<[Shard]> = (0..n).map(|_| Shard::new()).collect();
        let mut scalars = Vec::with_capacity(HOT_SCALARS);
        for (name, help) in SCALAR_NAMES {
            scalars.push(IntCounter::new(name, help)?);
        }
        let dropped_packets = IntCounterVec::new(
            Opts::new(
                "derp_packets_dropped",
                "Packets dropped, by reason and kind.",
            ),
            &["reason", "kind"],
        )?;
        let dropped_bytes = IntCounterVec::new(
            Opts::new("derp_bytes_dropped", "Bytes dropped, by reason and kind."),
            &["reason", "kind"],
        )?;
        for r in DropReason::ALL {
            for k in [PacketKind::Disco, PacketKind::Other] {
                dropped_packets.with_label_values(&[r.as_str(), k.as_str()]);
                dropped_bytes.with_label_values(&[r.as_str(), k.as_str()]);
            }
        }
        Ok(Self {
            shards,
            mask: n - 1,
            scalars,
            dropped_packets,
            dropped_bytes,
            scrape: Mutex::new(()),
        })
    }

    #[inline]
    fn shard(&self) -> &Shard {
        let slot = THREAD_SLOT.try_with(|s| *s).unwrap_or(0);
        // `mask` is len-1 of a non-empty power-of-two slice, so the index is in bounds.
        &self.shards[slot & self.mask]
    }

    #[inline]
    pub(crate) fn add(&self, c: Hot, n: u64) {
        self.shard().0[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Two counters with one shard lookup (packets + bytes).
    #[inline]
    pub(crate) fn add2(&self, c1: Hot, n1: u64, c2: Hot, n2: u64) {
        let s = self.shard();
        s.0[c1 as usize].fetch_add(n1, Ordering::Relaxed);
        s.0[c2 as usize].fetch_add(n2, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn drop_packet(&self, reason: DropReason, kind: PacketKind, bytes: usize) {
        let i = HOT_SCALARS + (reason as usize) * 2 + kind as usize;
        let s = self.shard();
        s.0[i].fetch_add(1, Ordering::Relaxed);
        s.0[i + DROP_SERIES].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Packets and bytes dropped so far for `reason` and `kind` (status page).
    pub(crate) fn dropped(&self, reason: DropReason, kind: PacketKind) -> (u64, u64) {
        let i = HOT_SCALARS + (reason as usize) * 2 + kind as usize;
        (self.sum(i), self.sum(i + DROP_SERIES))
    }

    fn sum(&self, slot: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0[slot].load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }

    fn set(c: &IntCounter, v: u64) {
        c.reset();
        c.inc_by(v);
    }
}

impl Collector for HotCounters {
    fn desc(&self) -> Vec<&Desc> {
        let mut v: Vec<&Desc> = self.scalars.iter().flat_map(|c| c.desc()).collect();
        v.extend(self.dropped_packets.desc());
        v.extend(self.dropped_bytes.desc());
        v
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // Serialize scrapes so reset+inc_by pairs of two scrapes never interleave.
        let _g = match self.scrape.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut out = Vec::with_capacity(HOT_SCALARS + 2);
        for (i, c) in self.scalars.iter().enumerate() {
            Self::set(c, self.sum(i));
            out.extend(c.collect());
        }
        for r in DropReason::ALL {
            for k in [PacketKind::Disco, PacketKind::Other] {
                let i = HOT_SCALARS + (r as usize) * 2 + k as usize;
                let labels = [r.as_str(), k.as_str()];
                Self::set(
                    &self.dropped_packets.with_label_values(&labels),
                    self.sum(i),
                );
                Self::set(
                    &self.dropped_bytes.with_label_values(&labels),
                    self.sum(i + DROP_SERIES),
                );
            }
        }
        out.extend(self.dropped_packets.collect());
        out.extend(self.dropped_bytes.collect());
        out
    }
}

/// Handshake failure reasons (label values of `derp_handshake_failures`).
pub(crate) const HANDSHAKE_REASONS: &[&str] = &[
    "timeout",
    "io",
    "not_client_info",
    "bad_length",
    "zero_key",
    "open_failed",
    "bad_json",
    "admission_denied",
    "shutting_down",
];

/// Protocol error kinds (label values of `derp_protocol_errors`).
pub(crate) const PROTOCOL_ERRORS: &[&str] = &[
    "frame_too_large",
    "short_send_packet",
    "send_packet_too_large",
    "short_forward_packet",
    "forward_packet_too_large",
    "bad_note_preferred",
    "bad_ping",
    "bad_close_peer",
    "bad_watch_conns",
    "insufficient_permissions",
];

/// All relay metrics. Cheap to clone handles live inside; shared via the server.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub hot: std::sync::Arc<HotCounters>,
    pub current_connections: IntGauge,
    pub current_home_connections: IntGauge,
    /// Connections whose client said this relay is not its ideal node (`Ideal-Node` header).
    pub current_notideal_connections: IntGauge,
    /// NotePreferred(true) from connections older than [`HOME_MOVE_SETTLE`] (derper's
    /// `homeMovesIn`).
    pub home_moves_in: IntCounter,
    /// NotePreferred(false) from connections older than [`HOME_MOVE_SETTLE`] (derper's
    /// `homeMovesOut`).
    pub home_moves_out: IntCounter,
    pub current_dup_client_keys: IntGauge,
    pub current_dup_client_conns: IntGauge,
    pub total_dup_client_conns: IntCounter,
    pub accepts: IntCounter,
    pub watchers: IntGauge,
    pub handshake_failures: IntCounterVec,
    pub protocol_errors: IntCounterVec,
    pub control_overflows: IntCounter,
    pub buffered_write_frames: Histogram,
    /// How long the oldest packet of each batch a writer drained waited in its queue.
    pub queue_wait: Histogram,
    /// Admission decisions about non-mesh clients (see [`ADMISSION_DECISIONS`]).
    pub admission: IntCounterVec,
    /// Admission verifier failures (unreachable, timeout), whatever the fail-open policy made
    /// of them.
    pub admission_verifier_errors: IntCounter,
    /// Per-client receive rate limit in force (bytes per second; 0 = off).
    pub rate_limit_bytes_per_second: IntGauge,
    /// Per-client receive token bucket size in force (bytes; 0 = off).
    pub rate_limit_burst_bytes: IntGauge,
    /// Frames that had to wait for the receive rate limit.
    pub rate_limit_waited: IntCounter,
}

/// NotePreferred frames within this time of the handshake are a client's initial home
/// announcement, not a move (derper ignores the first 5 seconds the same way).
pub(crate) const HOME_MOVE_SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Label values of `derp_admission_total{decision}`: `admitted` (known key, or verifier said
/// allow, or fail open), `refused` (the connection was closed in the handshake), `pending`
/// (unknown key admitted for its grace period), then for each pending one either `confirmed`
/// (its key became known in time) or `expired` (it did not: the connection was closed).
pub(crate) const ADMISSION_DECISIONS: &[&str] =
    &["admitted", "refused", "pending", "confirmed", "expired"];

impl Metrics {
    pub(crate) fn new(registry: &Registry) -> prometheus::Result<Self> {
        let hot = std::sync::Arc::new(HotCounters::new()?);
        let gauge = |n: &str, h: &str| IntGauge::new(n, h);
        let m = Metrics {
            current_connections: gauge("derp_current_connections", "Current client connections.")?,
            current_home_connections: gauge(
                "derp_current_home_connections",
                "Current connections whose client marked this server as home (NotePreferred).",
            )?,
            current_notideal_connections: gauge(
                "derp_current_notideal_connections",
                "Current connections whose client said this relay is not its ideal node.",
            )?,
            home_moves_in: IntCounter::new(
                "derp_home_moves_in",
                "Established clients that moved their home to this relay (NotePreferred true, \
                 not counting the first 5 s of a connection).",
            )?,
            home_moves_out: IntCounter::new(
                "derp_home_moves_out",
                "Established clients that moved their home away from this relay (NotePreferred \
                 false, not counting the first 5 s of a connection).",
            )?,
            current_dup_client_keys: gauge(
                "derp_current_dup_client_keys",
                "Keys that currently have more than one connection.",
            )?,
            current_dup_client_conns: gauge(
                "derp_current_dup_client_conns",
                "Connections that currently share their key with another connection.",
            )?,
            total_dup_client_conns: IntCounter::new(
                "derp_total_dup_client_conns",
                "Connections that ever shared their key with another connection.",
            )?,
            accepts: IntCounter::new("derp_accepts", "Connections accepted (handshake started).")?,
            watchers: gauge("derp_watchers", "Mesh connections watching presence (WatchConns).")?,
            handshake_failures: IntCounterVec::new(
                Opts::new("derp_handshake_failures", "Handshakes that failed, by reason."),
                &["reason"],
            )?,
            protocol_errors: IntCounterVec::new(
                Opts::new(
                    "derp_protocol_errors",
                    "Connections closed for bad client input, by kind.",
                ),
                &["kind"],
            )?,
            control_overflows: IntCounter::new(
                "derp_control_overflows",
                "Connections closed because their control-frame list (PeerGone/PeerPresent) overflowed.",
            )?,
            buffered_write_frames: Histogram::with_opts(
                HistogramOpts::new(
                    "derp_buffered_write_frames",
                    "Frames written per flush to one connection.",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            )?,
            queue_wait: Histogram::with_opts(
                HistogramOpts::new(
                    "derp_queue_wait_seconds",
                    "Time the oldest packet of each batch a connection's writer took from its \
                     queue had waited there (from the queue turning non-empty); derper's \
                     average_queue_duration_ms as a histogram.",
                )
                .buckets(vec![
                    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
                    2.0,
                ]),
            )?,
            admission: IntCounterVec::new(
                Opts::new(
                    "derp_admission_total",
                    "Admission decisions about non-mesh clients: admitted, refused, pending \
                     (unknown key within its grace period), confirmed, expired.",
                ),
                &["decision"],
            )?,
            admission_verifier_errors: IntCounter::new(
                "derp_admission_verifier_errors_total",
                "Admission verifier calls that failed (unreachable, timeout), before the \
                 fail-open policy decided.",
            )?,
            rate_limit_bytes_per_second: gauge(
                "derp_rate_limit_per_client_bytes_per_second",
                "Per-client receive rate limit in bytes per second (0 = off).",
            )?,
            rate_limit_burst_bytes: gauge(
                "derp_rate_limit_per_client_burst_bytes",
                "Per-client receive token bucket size in bytes (0 = off).",
            )?,
            rate_limit_waited: IntCounter::new(
                "derp_rate_limit_per_client_waited",
                "Frames whose reading waited for the per-client receive rate limit.",
            )?,
            hot,
        };
        for d in ADMISSION_DECISIONS {
            m.admission.with_label_values(&[d]);
        }
        for r in HANDSHAKE_REASONS {
            m.handshake_failures.with_label_values(&[r]);
        }
        for k in PROTOCOL_ERRORS {
            m.protocol_errors.with_label_values(&[k]);
        }
        registry.register(Box::new(HotCollector(m.hot.clone())))?;
        registry.register(Box::new(m.current_connections.clone()))?;
        registry.register(Box::new(m.current_home_connections.clone()))?;
        registry.register(Box::new(m.current_notideal_connections.clone()))?;
        registry.register(Box::new(m.home_moves_in.clone()))?;
        registry.register(Box::new(m.home_moves_out.clone()))?;
        registry.register(Box::new(m.current_dup_client_keys.clone()))?;
        registry.register(Box::new(m.current_dup_client_conns.clone()))?;
        registry.register(Box::new(m.total_dup_client_conns.clone()))?;
        registry.register(Box::new(m.accepts.clone()))?;
        registry.register(Box::new(m.watchers.clone()))?;
        registry.register(Box::new(m.handshake_failures.clone()))?;
        registry.register(Box::new(m.protocol_errors.clone()))?;
        registry.register(Box::new(m.control_overflows.clone()))?;
        registry.register(Box::new(m.queue_wait.clone()))?;
        registry.register(Box::new(m.buffered_write_frames.clone()))?;
        registry.register(Box::new(m.admission.clone()))?;
        registry.register(Box::new(m.admission_verifier_errors.clone()))?;
        registry.register(Box::new(m.rate_limit_bytes_per_second.clone()))?;
        registry.register(Box::new(m.rate_limit_burst_bytes.clone()))?;
        registry.register(Box::new(m.rate_limit_waited.clone()))?;
        Ok(m)
    }

    pub(crate) fn handshake_failed(&self, reason: &str) {
        self.handshake_failures.with_label_values(&[reason]).inc();
    }

    pub(crate) fn admission(&self, decision: &str) {
        self.admission.with_label_values(&[decision]).inc();
    }

    pub(crate) fn protocol_error(&self, kind: &str) {
        self.protocol_errors.with_label_values(&[kind]).inc();
    }
}

/// Registers the shared [`HotCounters`] (the registry wants an owned collector).
struct HotCollector(std::sync::Arc<HotCounters>);

impl Collector for HotCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }
    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(reg: &Registry, series: &str) -> f64 {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&reg.gather())
            .expect("encode");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
    }

    #[test]
    fn hot_counters_sum_across_threads_and_precreate_drops() {
        let reg = Registry::new();
        let m = Metrics::new(&reg).expect("metrics");
        m.hot.add(Hot::PacketsSent, 3);
        let h = m.hot.clone();
        std::thread::spawn(move || {
            h.add(Hot::PacketsSent, 4);
            h.drop_packet(DropReason::QueueHead, PacketKind::Other, 100);
        })
        .join()
        .expect("join");
        assert_eq!(scrape(&reg, "derp_packets_sent"), 7.0);
        // scraping twice does not double count
        assert_eq!(scrape(&reg, "derp_packets_sent"), 7.0);
        assert_eq!(
            scrape(
                &reg,
                "derp_bytes_dropped{kind=\"other\",reason=\"queue_head\"}"
            ),
            100.0
        );
        assert_eq!(
            scrape(
                &reg,
                "derp_packets_dropped{kind=\"disco\",reason=\"dup_client\"}"
            ),
            0.0
        );
        assert_eq!(
            scrape(&reg, "derp_handshake_failures{reason=\"zero_key\"}"),
            0.0
        );
    }
}
