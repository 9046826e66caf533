//! Coordinator capacity: the highest offered update rate a server delivers within bounds, found
//! by search, with the server held to a fixed CPU share so that it, not the load generator, is
//! the limit.
//!
//! Why: a comparison at one fixed load says little when both servers are below saturation (both
//! deliver everything; only CPU differs) or when the load generator saturates first (on two cores
//! it costs about as much per update as the server). Capacity compares like with like: for one
//! workload shape, the highest rate at which each server still delivers ≥ 99 % of the offered
//! updates with p99 latency ≤ 100 ms (fan-out and to-agent) and no failed stream ([`passes`]);
//! the ratio between two servers' capacities on the same shape is the figure that counts.
//!
//! Method ([`search`]): probes at a per-peer rate, doubling while they pass, halving while they
//! fail, then bisecting between the highest pass and the lowest fail a fixed number of times.
//! Each probe is a fresh server and a fresh load generator run (`compare` does that). The CPU
//! share is a cgroup ([`CpuShare`]: v2 `cpu.max`, or v1 CFS quota) the server is started in.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::coord::CoordReport;

/// Delivered share of the offered updates a passing probe needs.
pub const MIN_DELIVERED: f64 = 0.99;
/// Fan-out and to-agent p99 a passing probe stays within, ms.
pub const MAX_P99_MS: f64 = 100.0;

/// Whether a probe's run is within the bounds (see the module doc), and if not, why.
pub fn passes(r: &CoordReport) -> Result<(), String> {
    if r.failed_streams > 0 {
        return Err(format!("{} failed streams", r.failed_streams));
    }
    if r.offered_deliveries_per_s <= 0.0 {
        return Err("nothing offered".into());
    }
    // A direction without a single sample says nothing about its latency (a low rate in a
    // short window may schedule no agent update at all): not a pass.
    if r.fanout_p50_ms <= 0.0 || r.to_agent_p50_ms <= 0.0 {
        return Err("no update measured in one direction".into());
    }
    let share = r.delivered_updates_per_s / r.offered_deliveries_per_s;
    if share < MIN_DELIVERED {
        return Err(format!("delivered {:.1} % of the offered", share * 100.0));
    }
    if r.fanout_p99_ms > MAX_P99_MS {
        return Err(format!("fan-out p99 {:.1} ms", r.fanout_p99_ms));
    }
    if r.to_agent_p99_ms > MAX_P99_MS {
        return Err(format!("to-agent p99 {:.1} ms", r.to_agent_p99_ms));
    }
    Ok(())
}

/// How far a search goes.
#[derive(Clone, Copy, Debug)]
pub struct SearchPlan {
    /// First per-peer rate (updates/s).
    pub start: f64,
    /// Doublings (while passing) or halvings (while failing) at most.
    pub steps: usize,
    /// Bisections between the highest pass and the lowest fail.
    pub bisections: usize,
}

/// Runs the search: `probe(rate)` measures one rate and says whether it passed. Returns the
/// highest passing rate (`None`: none passed within the halvings). Stops early where the
/// budget ends: a server that still passes after `steps` doublings gets that rate, stated as
/// a lower bound by the caller.
pub fn search(plan: SearchPlan, mut probe: impl FnMut(f64) -> Result<bool>) -> Result<Option<f64>> {
    let (mut pass, mut fail): (Option<f64>, Option<f64>) = (None, None);
    let mut rate = plan.start;
    let mut steps = 0;
    let mut bisections = 0;
    loop {
        if probe(rate)? {
            pass = Some(pass.map_or(rate, |p: f64| p.max(rate)));
        } else {
            fail = Some(fail.map_or(rate, |f: f64| f.min(rate)));
        }
        rate = match (pass, fail) {
            (Some(p), Some(f)) => {
                if bisections == plan.bisections {
                    break;
                }
                bisections += 1;
                (p + f) / 2.0
            }
            (Some(p), None) | (None, Some(p)) => {
                if steps == plan.steps {
                    break;
                }
                steps += 1;
                if pass.is_some() {
                    p * 2.0
                } else {
                    p / 2.0
                }
            }
            (None, None) => unreachable!("a probe either passed or failed"),
        };
    }
    Ok(pass)
}

/// One probe of a search, as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Probe {
    /// Per-peer update rate (agents and clients alike).
    pub rate_per_peer: f64,
    /// The load generator's report.
    pub report: CoordReport,
    /// `None` if within the bounds, else why not.
    pub failed: Option<String>,
}

/// One whole search on one server and shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CapacityReport {
    /// The shape (`--only coord-cap` cell).
    pub shape: String,
    /// CPU share the server was held to (cores), `None` if unconstrained.
    pub cpu_share: Option<f64>,
    /// Every probe in the order run.
    pub probes: Vec<Probe>,
}

impl CapacityReport {
    /// The passing probe with the highest offered rate: the capacity.
    pub fn best(&self) -> Option<&Probe> {
        self.probes
            .iter()
            .filter(|p| p.failed.is_none())
            .max_by(|a, b| {
                a.report
                    .offered_deliveries_per_s
                    .total_cmp(&b.report.offered_deliveries_per_s)
            })
    }

    /// Offered updates/s at capacity (0 if nothing passed).
    pub fn capacity(&self) -> f64 {
        self.best()
            .map_or(0.0, |p| p.report.offered_deliveries_per_s)
    }

    /// When no probe passed: the lowest offered updates/s that failed, an upper bound on the
    /// capacity (`None` when something passed or nothing was probed).
    pub fn failed_below(&self) -> Option<f64> {
        if self.best().is_some() {
            return None;
        }
        self.probes
            .iter()
            .map(|p| p.report.offered_deliveries_per_s)
            .filter(|r| *r > 0.0)
            .min_by(f64::total_cmp)
    }

    /// Whether the best probe was also the highest rate tried (capacity is a lower bound).
    pub fn open_ended(&self) -> bool {
        let top = self
            .probes
            .iter()
            .map(|p| p.rate_per_peer)
            .fold(0.0, f64::max);
        self.best().is_some_and(|b| b.rate_per_peer >= top)
    }
}

/// Measurement window of a probe at `rate` updates/s per peer: at least `base` seconds and long
/// enough for every peer to send [`MIN_SENDS`] updates in it; `None` past [`MAX_WINDOW_S`]
/// (the rate is below what one probe can measure).
pub fn probe_window(base: f64, rate: f64) -> Option<f64> {
    if rate <= 0.0 {
        return None;
    }
    let w = base.max(MIN_SENDS / rate);
    (w <= MAX_WINDOW_S).then_some(w)
}

/// Updates every peer sends inside a probe's window at least.
pub const MIN_SENDS: f64 = 3.0;
/// Longest probe window, seconds.
pub const MAX_WINDOW_S: f64 = 60.0;

/// Server CPU µs per delivered update of a run (`None` without a CPU reading).
pub fn cpu_us_per_update(r: &CoordReport) -> Option<f64> {
    let cpu = r.server_cpu_util?;
    (r.delivered_updates_per_s > 0.0).then(|| cpu / r.delivered_updates_per_s * 1e6)
}

/// A CPU cgroup holding what is started in it to `cores` of CPU (quota per 100 ms period);
/// removed on drop (once its processes are gone).
#[derive(Debug)]
pub struct CpuShare {
    dir: PathBuf,
    /// The share, cores.
    pub cores: f64,
}

impl CpuShare {
    /// Creates the cgroup `tailnetd-bench-<pid>` (cgroup v2 if mounted, else v1's `cpu`).
    pub fn new(cores: f64) -> Result<CpuShare> {
        let quota = (cores * 100_000.0).round().max(1_000.0) as u64;
        let name = format!("tailnetd-bench-{}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let dir = if v2 {
            Path::new("/sys/fs/cgroup").join(&name)
        } else {
            Path::new("/sys/fs/cgroup/cpu").join(&name)
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the cgroup {}", dir.display()))?;
        let share = CpuShare { dir, cores };
        let write = |file: &str, v: String| {
            std::fs::write(share.dir.join(file), v)
                .with_context(|| format!("writing {file} of {}", share.dir.display()))
        };
        if v2 {
            write("cpu.max", format!("{quota} 100000"))?;
        } else {
            write("cpu.cfs_period_us", "100000".into())?;
            write("cpu.cfs_quota_us", quota.to_string())?;
        }
        Ok(share)
    }

    /// `cmd` started inside the cgroup (a shell moves itself in, then execs the command, so
    /// the pid is the command's).
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"echo $$ >"$1/cgroup.procs" && shift && exec "$@""#)
            .arg("sh")
            .arg(&self.dir)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        c
    }
}

impl Drop for CpuShare {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that passes below `limit`: the search must end within one bisection step of it.
    fn found(limit: f64, plan: SearchPlan) -> (Option<f64>, Vec<f64>) {
        let mut tried = Vec::new();
        let got = search(plan, |r| {
            tried.push(r);
            Ok(r <= limit)
        })
        .unwrap();
        (got, tried)
    }

    #[test]
    fn search_doubles_then_bisects_to_within_the_last_step() {
        let plan = SearchPlan {
            start: 1.0,
            steps: 10,
            bisections: 3,
        };
        let (got, tried) = found(11.0, plan);
        // 1 2 4 8 16 | 12 10 11
        assert_eq!(tried, vec![1.0, 2.0, 4.0, 8.0, 16.0, 12.0, 10.0, 11.0]);
        assert_eq!(got, Some(11.0));
        // Starting too high: halves down, then bisects.
        let (got, tried) = found(
            3.0,
            SearchPlan {
                start: 16.0,
                ..plan
            },
        );
        assert_eq!(tried, vec![16.0, 8.0, 4.0, 2.0, 3.0, 3.5, 3.25]);
        assert_eq!(got, Some(3.0));
    }

    #[test]
    fn search_stops_at_its_budget() {
        let plan = SearchPlan {
            start: 1.0,
            steps: 2,
            bisections: 1,
        };
        // Never fails: 1 2 4, and 4 is all it can say.
        assert_eq!(found(1e9, plan), (Some(4.0), vec![1.0, 2.0, 4.0]));
        // Never passes: 1 0.5 0.25, none.
        assert_eq!(found(0.0, plan), (None, vec![1.0, 0.5, 0.25]));
    }

    fn report(offered: f64, delivered: f64, fan: f64, to_agent: f64, failed: u64) -> CoordReport {
        serde_json::from_value(serde_json::json!({
            "mode": "coordinator", "label": "x", "flavor": "tailnetd", "agents": 1,
            "clients_per_agent": 1, "peers": 2, "offered_deliveries_per_s": offered,
            "delivered_updates_per_s": delivered, "fanout_p50_ms": 1.0, "fanout_p99_ms": fan,
            "fanout_max_ms": fan, "to_agent_p50_ms": 1.0, "to_agent_p99_ms": to_agent,
            "setup_peers_per_s": 1.0, "rss_per_peer_bytes": null, "server_cpu_util": 0.2,
            "server_peak_rss_bytes": null, "failed_streams": failed
        }))
        .unwrap()
    }

    #[test]
    fn probe_windows_hold_three_sends_of_every_peer() {
        assert_eq!(probe_window(5.0, 4.0), Some(5.0));
        assert_eq!(probe_window(5.0, 0.25), Some(12.0));
        assert_eq!(probe_window(5.0, 0.05), Some(60.0));
        assert_eq!(probe_window(5.0, 0.04), None);
        assert_eq!(probe_window(5.0, 0.0), None);
    }

    #[test]
    fn bounds_are_delivery_latency_and_failed_streams() {
        assert!(passes(&report(100.0, 99.0, 100.0, 100.0, 0)).is_ok());
        assert!(passes(&report(100.0, 98.9, 5.0, 5.0, 0)).is_err());
        assert!(passes(&report(100.0, 100.0, 100.1, 5.0, 0)).is_err());
        assert!(passes(&report(100.0, 100.0, 5.0, 100.1, 0)).is_err());
        assert!(passes(&report(100.0, 100.0, 5.0, 5.0, 1)).is_err());
        assert!(passes(&report(0.0, 0.0, 0.0, 0.0, 0)).is_err());
        // No sample in one direction (fan-out p50 of an empty histogram is 0): not a pass.
        let mut none = report(100.0, 100.0, 5.0, 5.0, 0);
        none.fanout_p50_ms = 0.0;
        assert!(passes(&none).is_err());
        let r = report(100.0, 100.0, 5.0, 5.0, 0);
        assert_eq!(cpu_us_per_update(&r), Some(2_000.0));
    }
}
