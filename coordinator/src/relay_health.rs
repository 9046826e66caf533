//! Health-driven regions: the coordinator probes every relay of its DERP map and marks a region
//! `Avoid` while none of its relays answers, so that agents and clients home elsewhere.
//!
//! Why here: the coordinator is what hands the map to every peer (`StreamDERPMaps`,
//! `/api/v2/derp-map`), so it is the one place where a failed region can be taken out of the
//! peers' choice of home. A region is avoided after `failures_to_avoid` consecutive rounds in
//! which no node of it passed, and restored after `successes_to_restore` consecutive good rounds.
//! A relay that answers its probe with "draining" (a tailnetd relay after SIGTERM, during its
//! readiness-off pause) makes its region avoided at once, so the map moves peers away before the
//! relay goes. The mark is an overlay on the base map ([`DerpMapSource::set_region_avoided`]):
//! configuration and file changes keep flowing, and a restored region gets back what its base
//! says.
//!
//! The probe itself (`GET /derp/probe`, then a DERP round trip) is DERP client work, which this
//! crate must not depend on: the binary implements [`RelayProber`] with the relay crate's client.
//! [`RegionTracker`] is the decision logic without I/O or clock, tested on its own.
//!
//! This module must never hold the map lock across a probe, probe a STUN-only node, or let a
//! hanging relay stall the round: every probe is bounded by `probe_timeout`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use proto::derpmap::{DerpMap, DerpNode};
use tokio_util::sync::CancellationToken;

use crate::derpmap::DerpMapSource;

/// What one probe of one relay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// `/derp/probe` answered and a DERP round trip completed.
    Up,
    /// The relay says it is draining (`/derp/probe` answered 503).
    Draining,
    /// Anything else; the text says what failed.
    Down(String),
}

/// A probe of one DERP node, owned by the caller (the binary implements it with the relay
/// crate's client).
pub trait RelayProber: Send + Sync + 'static {
    /// Probes `node`; the returned future owns what it needs.
    fn probe(&self, node: &DerpNode) -> Pin<Box<dyn Future<Output = ProbeOutcome> + Send>>;
}

/// How often and how strictly regions are judged.
#[derive(Debug, Clone)]
pub struct RegionHealthConfig {
    /// Time between probe rounds; zero disables probing.
    pub interval: Duration,
    /// Bound on one probe of one node.
    pub probe_timeout: Duration,
    /// Consecutive failed rounds before a region is avoided.
    pub failures_to_avoid: u32,
    /// Consecutive good rounds before an avoided region is restored.
    pub successes_to_restore: u32,
}

impl Default for RegionHealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(5),
            failures_to_avoid: 3,
            successes_to_restore: 2,
        }
    }
}

/// The verdict of one round for one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundResult {
    /// At least one node passed.
    Good,
    /// No node passed and at least one is draining.
    Draining,
    /// No node passed.
    Failed,
}

impl RoundResult {
    /// A region is as good as its best node.
    pub fn of(outcomes: &[ProbeOutcome]) -> Self {
        if outcomes.contains(&ProbeOutcome::Up) {
            RoundResult::Good
        } else if outcomes.contains(&ProbeOutcome::Draining) {
            RoundResult::Draining
        } else {
            RoundResult::Failed
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct RegionState {
    avoided: bool,
    failures: u32,
    successes: u32,
}

/// Consecutive-round bookkeeping per region: decides when a region turns avoided or restored.
#[derive(Debug, Default)]
pub struct RegionTracker {
    failures_to_avoid: u32,
    successes_to_restore: u32,
    regions: BTreeMap<i64, RegionState>,
}

impl RegionTracker {
    /// Thresholds from `config` (each at least 1).
    pub fn new(config: &RegionHealthConfig) -> Self {
        Self {
            failures_to_avoid: config.failures_to_avoid.max(1),
            successes_to_restore: config.successes_to_restore.max(1),
            regions: BTreeMap::new(),
        }
    }

    /// Records one round for `region`; returns `Some(avoided)` when the region's mark changes.
    pub fn record(&mut self, region: i64, result: RoundResult) -> Option<bool> {
        let st = self.regions.entry(region).or_default();
        match result {
            RoundResult::Good => {
                st.failures = 0;
                if st.avoided {
                    st.successes += 1;
                    if st.successes >= self.successes_to_restore {
                        st.avoided = false;
                        st.successes = 0;
                        return Some(false);
                    }
                }
            }
            RoundResult::Draining | RoundResult::Failed => {
                st.successes = 0;
                st.failures = st.failures.saturating_add(1);
                let due = result == RoundResult::Draining || st.failures >= self.failures_to_avoid;
                if !st.avoided && due {
                    st.avoided = true;
                    return Some(true);
                }
            }
        }
        None
    }

    /// Forgets regions no longer in the map; returns the ones that were avoided.
    pub fn retain(&mut self, present: &BTreeSet<i64>) -> Vec<i64> {
        let gone: Vec<i64> = self
            .regions
            .keys()
            .filter(|id| !present.contains(id))
            .copied()
            .collect();
        let mut avoided = Vec::new();
        for id in gone {
            if self.regions.remove(&id).is_some_and(|st| st.avoided) {
                avoided.push(id);
            }
        }
        avoided
    }
}

/// `coordinator_derp_region_*` metrics.
#[derive(Debug, Clone)]
pub struct RegionHealthMetrics {
    /// `coordinator_derp_region_healthy{region}`: 1 while the region is not avoided by health.
    pub healthy: IntGaugeVec,
    /// `coordinator_derp_probes_total{result}`: node probes by result (up, draining, down).
    pub probes: IntCounterVec,
    /// `coordinator_derp_region_transitions_total{to}`: regions marked avoided / restored.
    pub transitions: IntCounterVec,
}

impl RegionHealthMetrics {
    /// Create and register on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let healthy = IntGaugeVec::new(
            Opts::new(
                "coordinator_derp_region_healthy",
                "1 while a DERP region passes its probes, 0 while it is marked Avoid.",
            ),
            &["region"],
        )?;
        let probes = IntCounterVec::new(
            Opts::new(
                "coordinator_derp_probes_total",
                "DERP relay probes by result (up, draining, down).",
            ),
            &["result"],
        )?;
        let transitions = IntCounterVec::new(
            Opts::new(
                "coordinator_derp_region_transitions_total",
                "DERP regions marked Avoid (to=avoided) or restored (to=restored) by health.",
            ),
            &["to"],
        )?;
        registry.register(Box::new(healthy.clone()))?;
        registry.register(Box::new(probes.clone()))?;
        registry.register(Box::new(transitions.clone()))?;
        Ok(Self {
            healthy,
            probes,
            transitions,
        })
    }
}

/// The DERP (non-STUN) nodes of every region of `map`.
fn probe_targets(map: &DerpMap) -> BTreeMap<i64, Vec<DerpNode>> {
    map.regions
        .iter()
        .map(|(id, r)| {
            let nodes: Vec<DerpNode> = r.nodes.iter().filter(|n| !n.stun_only).cloned().collect();
            (*id, nodes)
        })
        .filter(|(_, nodes)| !nodes.is_empty())
        .collect()
}

/// Probes every relay of `source`'s base map each `interval` until `cancel` fires, marking
/// regions avoided and restored on `source`. Returns at once if the interval is zero.
pub async fn run(
    source: DerpMapSource,
    prober: Arc<dyn RelayProber>,
    config: RegionHealthConfig,
    metrics: RegionHealthMetrics,
    cancel: CancellationToken,
) {
    if config.interval.is_zero() {
        return;
    }
    let mut tracker = RegionTracker::new(&config);
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let targets = probe_targets(&source.base());
        let present: BTreeSet<i64> = targets.keys().copied().collect();
        for id in tracker.retain(&present) {
            mark(&source, &metrics, id, false);
            let _ = metrics.healthy.remove_label_values(&[&id.to_string()]);
        }
        // Every node of every region at once; each probe bounded.
        let rounds = targets.iter().map(|(id, nodes)| {
            let probes = nodes.iter().map(|n| {
                let fut = prober.probe(n);
                let timeout = config.probe_timeout;
                async move {
                    tokio::time::timeout(timeout, fut)
                        .await
                        .unwrap_or_else(|_| ProbeOutcome::Down("probe timed out".into()))
                }
            });
            async move { (*id, futures_util::future::join_all(probes).await) }
        });
        let results = tokio::select! {
            _ = cancel.cancelled() => return,
            r = futures_util::future::join_all(rounds) => r,
        };
        for (id, outcomes) in results {
            for o in &outcomes {
                let label = match o {
                    ProbeOutcome::Up => "up",
                    ProbeOutcome::Draining => "draining",
                    ProbeOutcome::Down(why) => {
                        tracing::debug!(region = id, error = %why, "DERP relay probe failed");
                        "down"
                    }
                };
                metrics.probes.with_label_values(&[label]).inc();
            }
            let result = RoundResult::of(&outcomes);
            if let Some(avoided) = tracker.record(id, result) {
                if avoided {
                    tracing::warn!(
                        region = id,
                        ?result,
                        ?outcomes,
                        "DERP region failing its probes: marked Avoid"
                    );
                } else {
                    tracing::info!(region = id, "DERP region passes its probes again: restored");
                }
                mark(&source, &metrics, id, avoided);
            }
            let healthy = !source.avoided_regions().contains(&id);
            metrics
                .healthy
                .with_label_values(&[&id.to_string()])
                .set(i64::from(healthy));
        }
    }
}

fn mark(source: &DerpMapSource, metrics: &RegionHealthMetrics, region: i64, avoided: bool) {
    match source.set_region_avoided(region, avoided) {
        Ok(_) => {
            let to = if avoided { "avoided" } else { "restored" };
            metrics.transitions.with_label_values(&[to]).inc();
        }
        Err(e) => {
            tracing::error!(region, error = %e, "publishing the DERP map with region health failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> RegionTracker {
        RegionTracker::new(&RegionHealthConfig {
            failures_to_avoid: 3,
            successes_to_restore: 2,
            ..Default::default()
        })
    }

    #[test]
    fn a_region_is_avoided_after_consecutive_failures_and_restored_after_successes() {
        let mut t = tracker();
        assert_eq!(t.record(1, RoundResult::Failed), None);
        assert_eq!(t.record(1, RoundResult::Failed), None);
        assert_eq!(t.record(1, RoundResult::Failed), Some(true));
        assert_eq!(t.record(1, RoundResult::Failed), None, "marked once");
        assert_eq!(t.record(1, RoundResult::Good), None);
        assert_eq!(t.record(1, RoundResult::Failed), None, "still avoided");
        assert_eq!(
            t.record(1, RoundResult::Good),
            None,
            "the good streak restarted"
        );
        assert_eq!(t.record(1, RoundResult::Good), Some(false));
    }

    #[test]
    fn failures_must_be_consecutive() {
        let mut t = tracker();
        for _ in 0..5 {
            assert_eq!(t.record(7, RoundResult::Failed), None);
            assert_eq!(t.record(7, RoundResult::Failed), None);
            assert_eq!(t.record(7, RoundResult::Good), None);
        }
    }

    #[test]
    fn a_draining_region_is_avoided_at_once() {
        let mut t = tracker();
        assert_eq!(t.record(2, RoundResult::Draining), Some(true));
    }

    #[test]
    fn a_region_is_as_good_as_its_best_node() {
        use ProbeOutcome::*;
        assert_eq!(RoundResult::of(&[Down("x".into()), Up]), RoundResult::Good);
        assert_eq!(
            RoundResult::of(&[Down("x".into()), Draining]),
            RoundResult::Draining
        );
        assert_eq!(RoundResult::of(&[Down("x".into())]), RoundResult::Failed);
    }

    #[test]
    fn regions_gone_from_the_map_are_forgotten() {
        let mut t = tracker();
        t.record(1, RoundResult::Draining);
        t.record(2, RoundResult::Good);
        let present: BTreeSet<i64> = [2].into_iter().collect();
        assert_eq!(t.retain(&present), vec![1]);
        assert_eq!(t.retain(&present), Vec::<i64>::new());
    }
}
