//! The `tailnetd` binary: parses the configuration, composes the relay and the coordinator for
//! the chosen role, serves until SIGTERM/SIGINT, then drains.
//!
//! This is the only place where `derp` and `coordinator` meet: the coordinator learns the relay's
//! public URL and STUN port for its DERP map, and the relay's HTTP front door hands every
//! non-DERP request to a router built from the coordinator's routes. Keep it thin: protocol logic
//! belongs in the library crates.

mod relay_probe;
mod status;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use coordinator::auth::{Authenticator, StaticAuthConfig, StaticAuthenticator};
use coordinator::config::CoordinatorConfig;
use coordinator::derpmap::{DerpMapConfig, DerpMapSource, EmbeddedRelay};
use coordinator::dev::DevCredentials;
use coordinator::upstream::proxy::ClientScheme;
use coordinator::upstream::{Upstream, UpstreamAuthenticator};
use coordinator::Coordinator;
use derp::{DerpHandler, EdgeConfig, HttpEdge};
use derp::{Server, ServerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tailnetd::config::{self, RelayAdmission, Role, Settings};

/// Exit status for a configuration error (EX_USAGE), so supervisors can tell it from a crash.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let invocation = config::parse_command_line();
    let settings = match Settings::resolve(&invocation) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "tailnetd: invalid configuration: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if invocation.check {
        return print_effective_configuration(&settings);
    }
    init_tracing(&settings);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tailnetd")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "tailnetd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "tailnetd stopped");
            ExitCode::FAILURE
        }
    }
}

/// `--check`: the configuration is valid; show what it resolved to.
#[allow(clippy::print_stdout, reason = "--check's output is the CLI's output")]
fn print_effective_configuration(s: &Settings) -> ExitCode {
    print!("{}", s.effective_toml());
    ExitCode::SUCCESS
}

fn init_tracing(s: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&s.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (stderr closed by a dead supervisor) is dropped;
        // reporting that failure on the same stderr would panic the process.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    if s.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Shared by `/readyz` and the drain sequence.
#[derive(Clone)]
struct Health {
    ready: Arc<AtomicBool>,
    /// With `postgres_url`: false while the replica's heartbeats fail.
    ha_healthy: Option<Arc<AtomicBool>>,
    registry: prometheus::Registry,
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&h.registry.gather(), &mut out) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            out,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if h.ha_healthy
        .as_ref()
        .is_some_and(|f| !f.load(Ordering::Relaxed))
    {
        (StatusCode::SERVICE_UNAVAILABLE, "coordinator unhealthy\n")
    } else if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    }
}

/// Health and readiness, plus `/metrics` when it is served on the public listener too.
fn ops_routes(health: Health, with_metrics: bool) -> Router {
    let routes = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    let routes = if with_metrics {
        routes.route("/metrics", get(metrics))
    } else {
        routes
    };
    routes.with_state(health)
}

/// `tailnetd_ready`: 1 while `/readyz` answers 200 (0 while draining, and with `postgres_url`
/// while the replica's heartbeats fail), read at scrape time.
struct ReadyGauge {
    health: Health,
    gauge: prometheus::IntGauge,
}

impl prometheus::core::Collector for ReadyGauge {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let ha_ok = self
            .health
            .ha_healthy
            .as_ref()
            .is_none_or(|f| f.load(Ordering::Relaxed));
        let ready = ha_ok && self.health.ready.load(Ordering::Relaxed);
        self.gauge.set(i64::from(ready));
        self.gauge.collect()
    }
}

/// `tailnetd_tokio_alive_tasks`: the tasks alive in tailnetd's runtime, read at each scrape (a
/// leak of tasks shows as a rising line; the soak charts it).
struct RuntimeGauges {
    runtime: tokio::runtime::Handle,
    alive_tasks: prometheus::IntGauge,
}

impl prometheus::core::Collector for RuntimeGauges {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.alive_tasks.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let alive = self.runtime.metrics().num_alive_tasks();
        self.alive_tasks
            .set(i64::try_from(alive).unwrap_or(i64::MAX));
        self.alive_tasks.collect()
    }
}

/// The metrics/admin listener, on its own address (loopback by default), served until
/// `cancel`: `/metrics`, and the status page at `/debug/` (see [`status`]).
async fn bind_metrics(
    addr: SocketAddr,
    health: Health,
    status: Arc<status::StatusPage>,
    cancel: CancellationToken,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))?;
    let bound = listener.local_addr().context("metrics listener address")?;
    let page = move || {
        let status = status.clone();
        async move {
            (
                [(header::CACHE_CONTROL, "no-store")],
                axum::response::Html(status.render()),
            )
        }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/debug/", get(page))
        .route(
            "/debug",
            get(|| async { axum::response::Redirect::permanent("/debug/") }),
        )
        .with_state(health);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(bound)
}

/// The URL clients use to reach this process: the configured public URL, else the first bound
/// listener (HTTPS preferred).
fn public_url(s: &Settings, http: Option<SocketAddr>, https: Option<SocketAddr>) -> String {
    if let Some(u) = &s.public_url {
        return u.trim_end_matches('/').to_string();
    }
    match (https, http) {
        (Some(a), _) => format!("https://{}", display_host(a)),
        (None, Some(a)) => format!("http://{}", display_host(a)),
        (None, None) => String::new(),
    }
}

/// An unspecified bind address is not somewhere a client can dial; advertise loopback instead.
fn display_host(a: SocketAddr) -> String {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, a.port()).to_string()
}

/// The relay's identity: the key file, or (only `dev` may leave it unset, which
/// `Settings::resolve` enforces) an ephemeral key.
fn relay_key(s: &Settings) -> Result<proto::key::NodePrivate> {
    match &s.listen.key_file {
        Some(path) => derp::edge::keyfile::load_or_create(path)
            .with_context(|| format!("key_file {}", path.display())),
        None => Ok(proto::key::NodePrivate::generate(&mut rand::rngs::OsRng)),
    }
}

async fn run(s: Settings) -> Result<()> {
    let registry = prometheus::Registry::new();
    // process_resident_memory_bytes etc.: memory per connection is read from these.
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .context("registering process metrics")?;
    registry
        .register(Box::new(RuntimeGauges {
            runtime: tokio::runtime::Handle::current(),
            alive_tasks: prometheus::IntGauge::new(
                "tailnetd_tokio_alive_tasks",
                "Tasks alive in tailnetd's async runtime (read at scrape).",
            )
            .context("tokio task gauge")?,
        }))
        .context("registering runtime metrics")?;
    let cancel = CancellationToken::new();
    let health = Health {
        ready: Arc::new(AtomicBool::new(false)),
        ha_healthy: None,
        registry: registry.clone(),
    };

    // The relay itself is created after the coordinator (its admission asks the coordinator's
    // graph); its key is needed first, for the listeners' meta certificate.
    let relay_private = if s.role.runs_relay() {
        Some(relay_key(&s)?)
    } else {
        None
    };

    // Bind everything before building the coordinator, so that port 0 resolves before the DERP
    // map names this relay's own port.
    let relay_key_bytes = relay_private.as_ref().map(|k| *k.public().as_bytes());
    let mut bound = derp::edge::listener::bind(&s.listen, relay_key_bytes.as_ref(), &registry)
        .await
        .context("opening listeners")?;
    let base_url = public_url(&s, bound.http_addr, bound.https_addr);

    let dev_credentials = (s.role == Role::Dev).then(DevCredentials::generate);
    // The coordinator's map, kept for region health (probing, and marking our own region when
    // this process drains).
    let mut map_source: Option<DerpMapSource> = None;
    let coordinator: Option<Arc<Coordinator>> = if s.role.runs_coordinator() {
        let mut tokens: StaticAuthConfig = s.auth.clone();
        if let Some(dev) = &dev_credentials {
            let extra = dev.auth_config();
            tokens.agents.extend(extra.agents);
            tokens.users.extend(extra.users);
        }
        // One upstream value for the authenticator, the Agent API forwarder and the proxy; the
        // coordinator holds it (config.upstream) and hands it back for the fallback router.
        let upstream = s
            .upstream
            .clone()
            .map(|cfg| Upstream::new(cfg, &registry))
            .transpose()
            .context("upstream")?;
        let auth: Arc<dyn Authenticator> = match &upstream {
            Some(up) => Arc::new(UpstreamAuthenticator::new(up.clone())),
            None => Arc::new(StaticAuthenticator::new(&tokens).context("auth")?),
        };
        let embedded = s
            .region
            .as_ref()
            .filter(|_| relay_private.is_some())
            .map(|r| EmbeddedRelay {
                region_id: r.region_id,
                region_code: r.region_code.clone(),
                region_name: r.region_name.clone(),
                public_url: base_url.clone(),
                stun_port: bound.stun_addr.map(|a| a.port()),
            });
        let source = DerpMapSource::new(DerpMapConfig {
            embedded,
            ..s.derp_map.clone()
        })
        .context("derp_map_file")?;
        map_source = Some(source.clone());
        let config = CoordinatorConfig {
            upstream,
            upstream_bridge: coordinator::upstream::bridge::BridgeConfig {
                enabled: s.upstream_bridge,
                ..Default::default()
            },
            ..s.coordinator.clone()
        };
        Some(
            Coordinator::new(config, auth, source, &registry)
                .context("starting the coordinator")?,
        )
    } else {
        None
    };

    let relay: Option<Arc<Server>> = match relay_private {
        Some(key) => {
            let mut cfg = ServerConfig::new(key);
            s.listen.apply_to(&mut cfg);
            if let Some(p) = &s.listen.mesh_psk_file {
                cfg.mesh_key = Some(
                    derp::edge::keyfile::load_mesh_key(p)
                        .with_context(|| format!("mesh_psk_file {}", p.display()))?,
                );
            }
            cfg.admission = relay_admission(&s.relay_admission, coordinator.as_ref())?;
            if let Some(p) = &s.rate_config {
                cfg.rate_config =
                    derp::RateConfig::load(p).context("relay.rate_config (--rate-config)")?;
            }
            let server = Server::new(cfg, &registry).context("starting the relay")?;
            if let Some(p) = &s.rate_config {
                spawn_rate_config_reload(server.clone(), p.clone(), cancel.clone())?;
            }
            Some(server)
        }
        None => None,
    };

    // Replicas: share the graph through PostgreSQL.
    let ha = match (&coordinator, &s.postgres_url) {
        (Some(c), Some(url)) => {
            let coderd_db = coordinator::ha::coderd_managed_at(url)
                .await
                .context("postgres_url: connecting")?;
            if coderd_db && s.upstream_bridge {
                anyhow::bail!(
                    "coordinator.postgres_url is a coderd-managed database (it has coderd's \
                     schema_migrations), so coderd's pgcoord already shares agents there; turn \
                     the sidecar bridge off (upstream.bridge = false), or every agent would \
                     appear twice"
                );
            }
            let options = coordinator::ha::HaOptions {
                registry: registry.clone(),
                ..Default::default()
            };
            let h = coordinator::ha::start_with(c.graph().clone(), url, options)
                .await
                .context("postgres_url: starting the replica store")?;
            tracing::info!(coordinator_id = %h.coordinator_id(), "sharing the peer graph through PostgreSQL");
            Some(h)
        }
        _ => None,
    };
    let health = Health {
        ha_healthy: ha.as_ref().map(|h| h.healthy_flag()),
        ..health
    };
    registry
        .register(Box::new(ReadyGauge {
            health: health.clone(),
            gauge: prometheus::IntGauge::new(
                "tailnetd_ready",
                "1 while /readyz answers 200: not draining and, with postgres_url, the replica's \
                 heartbeats succeed.",
            )
            .context("tailnetd_ready")?,
        }))
        .context("registering tailnetd_ready")?;

    let mut app = ops_routes(health.clone(), s.metrics_on_public_listener);
    // ACME HTTP-01 answers (the CA asks on the plain HTTP listener, port 80).
    if let Some(acme) = &bound.acme {
        app = app.merge(acme.http01_router());
    }
    if let Some(c) = &coordinator {
        app = app.merge(c.router());
        if let Some(up) = c.upstream() {
            // The proxy is the fallback: it must be merged last, and there is no other.
            app = app.merge(up.proxy_router(c.clone()));
        }
    }
    // The proxy reports the client's scheme in X-Forwarded-Proto.
    let app = app.layer(axum::middleware::map_request(
        |mut req: axum::extract::Request| async move {
            let tls = req
                .extensions()
                .get::<derp::ConnScheme>()
                .is_some_and(|s| s.tls);
            req.extensions_mut()
                .insert(ClientScheme(if tls { "https" } else { "http" }));
            req
        },
    ));
    let derp_handler: Option<Arc<dyn DerpHandler>> =
        relay.clone().map(|r| r as Arc<dyn DerpHandler>);
    let edge = HttpEdge::with_relay_cap(derp_handler, app, &registry, bound.relay_cap)
        .context("registering metrics")?;

    // Region health: probe every relay of the map, mark failing regions Avoid.
    let region_health = match &map_source {
        Some(src) if !s.region_health.interval.is_zero() => {
            let metrics = coordinator::relay_health::RegionHealthMetrics::new(&registry)
                .context("registering region health metrics")?;
            let prober = Arc::new(relay_probe::DerpProber::new(s.region_health.probe_timeout));
            Some(tokio::spawn(coordinator::relay_health::run(
                src.clone(),
                prober,
                s.region_health.clone(),
                metrics,
                cancel.clone(),
            )))
        }
        _ => None,
    };

    // The metrics listener ends with `cancel`; its failure is logged, never a reason to drain.
    let metrics_addr = match s.metrics_addr {
        Some(addr) => {
            let page = Arc::new(status::StatusPage::new(
                s.role.name(),
                coordinator.clone(),
                relay.clone(),
                map_source.clone(),
            ));
            Some(bind_metrics(addr, health.clone(), page, cancel.clone()).await?)
        }
        None => None,
    };
    let running = bound.spawn(edge.clone(), cancel.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for t in running.tasks {
        tasks.spawn(async move {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "a listener task panicked");
            }
        });
    }

    // Outbound mesh links, once this relay serves: a peer that dials back finds it up.
    let mesh = match &relay {
        Some(r) => Some(start_mesh(r, &s.listen)?),
        None => None,
    };
    let quic_mesh = match &relay {
        Some(r) => Some(start_quic_mesh(r, &s.listen)?),
        None => None,
    };

    let mut signals = ShutdownSignals::register()?;
    health.ready.store(true, Ordering::Relaxed);
    announce(
        &s,
        &bound,
        metrics_addr,
        &base_url,
        relay.as_deref(),
        dev_credentials.as_ref(),
    )?;

    let signalled = tokio::select! {
        _ = signals.next() => true,
        Some(_) = tasks.join_next() => {
            tracing::error!("a listener stopped unexpectedly: draining");
            false
        }
    };
    health.ready.store(false, Ordering::Relaxed);
    // Tell region health before anything closes: our relay's probe answers "draining", and a
    // coordinator here takes its own region out of the map at once.
    edge.set_draining();
    if let (Some(src), Some(region)) = (&map_source, s.region.as_ref().filter(|_| relay.is_some()))
    {
        if let Err(e) = src.set_region_avoided(region.region_id, true) {
            tracing::warn!(error = %e, "marking this relay's region Avoid before draining failed");
        }
    }
    if signalled && !s.drain_pause.is_zero() {
        // Load balancers see 503 on /readyz and stop sending new connections while everything
        // is still served; only then does the drain close anything.
        tracing::info!(pause = ?s.drain_pause, "signal received: not ready; draining after the pause");
        tokio::select! {
            _ = tokio::time::sleep(s.drain_pause) => {}
            _ = signals.next() => tracing::info!("second signal: pause cut short"),
        }
    }
    tracing::info!("draining");
    let drain = async {
        let relay_drain = async {
            if let Some(m) = mesh {
                m.shutdown().await;
            }
            if let Some(m) = quic_mesh {
                m.shutdown().await;
            }
            if let Some(r) = &relay {
                r.shutdown().await;
            }
        };
        let coord_drain = async {
            if let Some(c) = &coordinator {
                c.shutdown().await;
            }
        };
        tokio::join!(relay_drain, coord_drain);
        if let Some(h) = ha {
            // Own peers become LOST to the other replicas (rows kept, like pgcoord).
            if let Err(e) = h.shutdown().await {
                tracing::warn!(error = %e, "marking this replica's peers lost failed");
            }
        }
        cancel.cancel();
        if let Some(t) = region_health {
            let _ = t.await;
        }
        while tasks.join_next().await.is_some() {}
    };
    if tokio::time::timeout(s.drain_deadline, drain).await.is_err() {
        tracing::warn!(
            deadline = ?s.drain_deadline,
            "drain deadline passed; exiting anyway"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// The relay's admission for the configured policy: the coordinator's graph (`serve`, `dev`),
/// derper's verify URL (`derp`), or none.
fn relay_admission(
    policy: &RelayAdmission,
    coordinator: Option<&Arc<Coordinator>>,
) -> Result<Option<Arc<dyn derp::Admission>>> {
    Ok(match policy {
        RelayAdmission::Open => None,
        RelayAdmission::Coordinated { grace } => {
            let graph = coordinator
                .context("relay admission by the coordinator needs the coordinator role")?
                .graph()
                .clone();
            tracing::info!(grace = ?grace, "relay admits node keys the coordinator knows");
            Some(Arc::new(derp::KnownKeys::new(
                move |k| graph.knows_node_key(k),
                *grace,
            )))
        }
        RelayAdmission::VerifyUrl { url, fail_open } => {
            let roots = derp::edge::verify_url::roots_from_env()
                .context("SSL_CERT_FILE (trusted roots for --verify-client-url)")?;
            let v = derp::edge::verify_url::UrlVerifier::new(url, *fail_open, &roots)
                .context("relay.verify_client_url")?;
            tracing::info!(url = %url, fail_open, "relay asks an admission controller about each client");
            Some(Arc::new(v))
        }
    })
}

/// Reloads derper's rate configuration file on SIGHUP (derper's `watchRateConfig`): a bad file
/// is logged and the limits in force stay.
fn spawn_rate_config_reload(
    server: Arc<Server>,
    path: std::path::PathBuf,
    cancel: CancellationToken,
) -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = hup.recv() => if got.is_none() { return },
                    _ = cancel.cancelled() => return,
                }
                match derp::RateConfig::load(&path) {
                    Ok(rc) => {
                        let applied = server.set_rate_config(rc);
                        tracing::info!(
                            bytes_per_sec = applied.per_client_rate_limit_bytes_per_sec,
                            burst_bytes = applied.per_client_rate_burst_bytes,
                            "SIGHUP: rate config reloaded"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "SIGHUP: rate config reload failed; keeping the limits in force")
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (server, path, cancel);
    Ok(())
}

/// Starts the outbound mesh links `--mesh-with` names (none if it is empty).
fn start_mesh(relay: &Arc<Server>, listen: &EdgeConfig) -> Result<derp::mesh::MeshHandle> {
    let peers = derp::mesh::parse_mesh_with(&listen.mesh_with).context("relay.mesh_with")?;
    let extra_roots = if peers.is_empty() {
        Vec::new()
    } else {
        derp::mesh::load_trust(listen.mesh_ca_file.as_deref()).context("mesh TLS roots")?
    };
    if !peers.is_empty() {
        tracing::info!(peers = ?peers.iter().map(|p| &p.url).collect::<Vec<_>>(), "meshing with");
    }
    derp::mesh::start(
        relay,
        derp::mesh::MeshOptions {
            peers,
            extra_roots,
            queue_depth: listen.mesh_queue_depth,
        },
    )
    .context("relay.mesh_with")
}

/// Starts the QUIC mesh (`--mesh-quic-addr`, `--mesh-quic-with`); nothing if both are empty.
fn start_quic_mesh(
    relay: &Arc<Server>,
    listen: &EdgeConfig,
) -> Result<derp::mesh::quic::QuicMeshHandle> {
    use derp::mesh::quic;
    let addr =
        quic::parse_mesh_quic_addr(&listen.mesh_quic_addr).context("relay.mesh_quic_addr")?;
    let peers =
        quic::parse_mesh_quic_with(&listen.mesh_quic_with).context("relay.mesh_quic_with")?;
    let h = quic::start(
        relay,
        quic::QuicMeshOptions {
            listen: addr,
            peers: peers.clone(),
            queue_depth: listen.mesh_queue_depth,
            timers: quic::QuicTimers::new(
                listen.mesh_quic_keepalive,
                listen.mesh_quic_idle_timeout,
            )
            .context("relay.mesh_quic_keepalive / relay.mesh_quic_idle_timeout")?,
        },
    )
    .context("QUIC mesh")?;
    if h.local_addr().is_some() || !peers.is_empty() {
        tracing::info!(listen = ?h.local_addr(), peers = ?peers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            "QUIC mesh");
    }
    Ok(h)
}

/// Prints the one JSON line that tells operators and test harnesses where everything listens.
#[allow(
    clippy::print_stdout,
    reason = "the announcement line is the CLI's output"
)]
fn announce(
    s: &Settings,
    bound: &derp::edge::listener::Bound,
    metrics_addr: Option<SocketAddr>,
    base_url: &str,
    relay: Option<&Server>,
    dev: Option<&DevCredentials>,
) -> Result<()> {
    let mut line = json!({
        "role": s.role.name(),
        "http_addr": bound.http_addr.map(|a| a.to_string()),
        "https_addr": bound.https_addr.map(|a| a.to_string()),
        "stun_addr": bound.stun_addr.map(|a| a.to_string()),
        "metrics_addr": metrics_addr.map(|a| a.to_string()),
        "derp_public_key": relay.map(|r| r.public_key().to_string()),
        "base_url": base_url,
    });
    if relay.is_some() {
        line["derp_url"] = json!(format!("{base_url}/derp"));
    }
    if let Some(d) = dev {
        line["agent_id"] = json!(d.agent_id.to_string());
        line["agent_token"] = json!(d.agent_token.to_string());
        line["client_token"] = json!(d.client_token);
    }
    let text = serde_json::to_string(&line).context("encoding the announcement")?;
    if let Some(path) = &s.credentials {
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("credentials {}", path.display()))?;
    }
    println!("{text}");
    Ok(())
}

/// The SIGTERM and SIGINT handlers, registered once and awaited as often as needed (the first
/// signal starts the readiness-off pause, a second one cuts it short).
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Registers the handlers now. Called before readiness is announced: a supervisor that sends
    /// SIGTERM right after reading the announcement must get a drain, not the default action
    /// (death by signal).
    fn register() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
                interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Waits for the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.interrupt.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "listening for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    }
}
