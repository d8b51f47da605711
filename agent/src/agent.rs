//! Wires the agent together: state, installer, supervisor, probes, engine,
//! admin socket and coordinator session. The binary and the tests call [`run`].

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::admin::{self, AdminService};
use crate::config::AgentConfig;
use crate::health::probe::RealProbe;
use crate::host_stats::{HostStats, SysinfoStats};
use crate::layout::Layout;
use crate::session::{GrpcSource, Session};
use crate::state::{SledStore, StateStore};
use crate::update::executor::{Deps, Engine, EngineConfig, EngineError};
use crate::update::installer::Installer;
use crate::update::supervisor::RealSupervisor;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data directory is unusable.
    #[error(
        "data directory {path}: {source}; create it (mode 0700) and make it writable by the agent's user"
    )]
    DataDir {
        /// The directory.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The state store cannot be opened.
    #[error("{0}; is another rollout-agent using the same data directory?")]
    Store(#[from] crate::state::StoreError),
    /// The config is inconsistent.
    #[error("config: {0}")]
    Config(String),
    /// Host statistics are unavailable.
    #[error("cannot read host statistics: {0}")]
    Stats(String),
    /// The engine did not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The admin socket did not bind.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
}

/// Runs the agent until `cancel`. Services keep running after it returns; a
/// restarted agent adopts them.
pub async fn run(config: AgentConfig, cancel: CancellationToken) -> Result<(), AgentError> {
    // Steady periodic work (checks of committed releases, samples, reports)
    // falls on whole periods after the agent's start.
    let wake_grid = tokio::time::Instant::now();
    let layout = Layout::new(&config.data_dir);
    let dir_err = |source| AgentError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(dir_err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        // With run_as, the service user must traverse to its release directory
        // (0711: no listing); state and cache stay private either way.
        let mode = if config.run_as.is_some() {
            0o711
        } else {
            0o700
        };
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(mode))
            .map_err(dir_err)?;
        for private in [layout.state_dir(), layout.cache_dir()] {
            std::fs::create_dir_all(&private).map_err(dir_err)?;
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))
                .map_err(dir_err)?;
        }
    }
    let store: Arc<dyn StateStore> = Arc::new(SledStore::open(&layout.state_dir())?);
    let stats: Arc<Mutex<dyn HostStats>> = Arc::new(Mutex::new(
        SysinfoStats::new().map_err(|e| AgentError::Stats(e.to_string()))?,
    ));
    let source = Arc::new(GrpcSource::default());
    let installer = Arc::new(
        Installer::new(layout.clone(), config.archive_limits, source.clone())
            .with_trusted_keys(&config.trusted_keys)
            .map_err(|e| AgentError::Config(e.to_string()))?,
    );
    let metrics = match config.metrics_listen {
        Some(addr) => Some((
            crate::metrics::bind(addr)
                .await
                .map_err(|e| AgentError::Config(format!("metrics_listen {addr}: {e}")))?,
            Arc::new(crate::metrics::Metrics::new()),
        )),
        None => None,
    };
    let engine = Engine::start(Deps {
        store,
        installer,
        supervisor: Arc::new(RealSupervisor::new(stats.clone())),
        probe: Arc::new(RealProbe::new()),
        stats: stats.clone(),
        layout,
        config: EngineConfig {
            retain_releases: config.retain_releases,
            crash_at: config.crash_at.clone(),
            host_env: config.env.clone(),
            run_as: config.run_as.as_ref().map(|(_, r)| *r),
            wake_grid,
            metrics: metrics
                .as_ref()
                .map(|(_, m)| crate::metrics::MetricsHandle::new(m.clone()))
                .unwrap_or_default(),
        },
    })?;
    let (connected_tx, connected_rx) = watch::channel(false);
    let listener = admin::bind(&config.admin_socket)?;
    info!(socket = %config.admin_socket.display(), host = %config.host, "agent started");
    let tasks = tokio_util::task::TaskTracker::new();
    let admin_svc = AdminService {
        engine: engine.clone(),
        stats: stats.clone(),
        host: config.host.clone(),
        data_dir: config.data_dir.clone(),
        connected: connected_rx,
    };
    let admin_cancel = cancel.child_token();
    tasks.spawn(async move {
        if let Err(e) = admin::serve(listener, admin_svc, admin_cancel).await {
            error!(error = %e, "admin socket stopped");
        }
    });
    if let Some((listener, metrics)) = metrics {
        info!(addr = ?listener.local_addr().ok(), "serving Prometheus metrics on /metrics");
        let (engine, stats, metrics_cancel) = (engine.clone(), stats.clone(), cancel.child_token());
        tasks.spawn(async move {
            let served = crate::metrics::serve(listener, metrics, engine, stats, metrics_cancel);
            if let Err(e) = served.await {
                error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    match &config.coordinator {
        Some(c) => {
            let session = Session {
                config: c.clone(),
                host: config.host.clone(),
                labels: config.labels.clone(),
                report_interval: config.report_interval,
                wake_grid,
                engine: engine.clone(),
                stats,
                data_dir: config.data_dir.clone(),
                source,
                connected: connected_tx,
            };
            tasks.spawn(session.run(cancel.child_token()));
        }
        None => info!("no [coordinator] configured: running standalone, local admin only"),
    }
    cancel.cancelled().await;
    info!("shutting down; services keep running");
    tasks.close();
    tasks.wait().await;
    engine.shutdown().await;
    let _ = std::fs::remove_file(&config.admin_socket);
    Ok(())
}
