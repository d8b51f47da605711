//! The local admin API (`AgentAdmin`) on a Unix socket with mode 0600, so an
//! operator on the host can see status, list releases and roll back with no
//! coordinator at all. Also the client the `rollout-agent` subcommands use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyper_util::rt::TokioIo;
use rollout_proto::pb;
use rollout_proto::pb::agent_admin_client::AgentAdminClient;
use rollout_proto::pb::agent_admin_server::{AgentAdmin, AgentAdminServer};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use crate::host_stats::HostStats;
use crate::report::{full_report, history_to_pb, service_report, status_of};
use crate::update::executor::Engine;

/// Admin socket failures.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Binding the socket failed.
    #[error(
        "bind admin socket {path}: {source}; is another agent running with the same data directory?"
    )]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The agent is not reachable on the socket.
    #[error(
        "cannot reach the agent on {path}: {message}; is rollout-agent running, and are you allowed to open its socket (it is mode 0600, owned by the agent's user)?"
    )]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The server failed.
    #[error("admin server: {0}")]
    Serve(String),
}

/// The admin service.
pub struct AdminService {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Host figures.
    pub stats: Arc<Mutex<dyn HostStats>>,
    /// This host's name.
    pub host: String,
    /// Data directory (disk free).
    pub data_dir: PathBuf,
    /// Whether the coordinator session is up.
    pub connected: watch::Receiver<bool>,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl AgentAdmin for AdminService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let report = full_report(
            &self.engine.views(),
            self.engine.store().as_ref(),
            self.stats.as_ref(),
            &self.data_dir,
        );
        Ok(Response::new(pb::StatusResponse {
            host: self.host.clone(),
            coordinator_connected: *self.connected.borrow(),
            report: Some(report),
        }))
    }

    async fn releases(
        &self,
        req: Request<pb::ReleasesRequest>,
    ) -> Result<Response<pb::ReleasesResponse>, Status> {
        let svc = req.into_inner().service;
        let view = self.engine.view(&svc).ok_or_else(|| {
            Status::not_found(format!(
                "service {svc:?} is unknown on this host; `rollout-agent status` lists the services"
            ))
        })?;
        let store = self.engine.store();
        let to_status = |e: crate::state::StoreError| Status::internal(e.to_string());
        let rec = &view.record;
        let releases = store
            .releases(&svc)
            .map_err(to_status)?
            .into_iter()
            .map(|r| pb::ReleaseInfo {
                release: r.release().to_string(),
                digest: r.digest().to_string(),
                staged_at_ms: r.staged_at_ms,
                current: rec.current.as_deref() == Some(r.release()),
                previous: rec.previous.as_deref() == Some(r.release()),
                last_known_good: rec.last_known_good.as_deref() == Some(r.release()),
            })
            .collect();
        let history = store
            .history(&svc, crate::state::HISTORY_KEEP)
            .map_err(to_status)?
            .iter()
            .map(history_to_pb)
            .collect();
        Ok(Response::new(pb::ReleasesResponse { releases, history }))
    }

    async fn rollback(
        &self,
        req: Request<pb::AdminRollbackRequest>,
    ) -> Result<Response<pb::AdminRollbackResponse>, Status> {
        let r = req.into_inner();
        let to = (!r.to_release.is_empty()).then_some(r.to_release.as_str());
        let reason = if r.reason.is_empty() {
            "requested on the host (rollout-agent rollback)"
        } else {
            r.reason.as_str()
        };
        let view = self
            .engine
            .rollback(&r.service, to, reason, "admin")
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(pb::AdminRollbackResponse {
            service: Some(service_report(&view, self.engine.store().as_ref())),
        }))
    }
}

/// Binds the admin socket (replacing a stale one), restricts it to mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |source| AdminError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    if path.exists() {
        // A live agent would answer; a stale socket file would not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "an agent is already listening there",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves the admin API on `listener` until `cancel`.
pub async fn serve(
    listener: UnixListener,
    svc: AdminService,
    cancel: CancellationToken,
) -> Result<(), AdminError> {
    tonic::transport::Server::builder()
        .add_service(AgentAdminServer::new(svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), cancel.cancelled_owned())
        .await
        .map_err(|e| AdminError::Serve(e.to_string()))
}

/// A client of the admin socket at `path`.
pub async fn connect(path: &Path) -> Result<AgentAdminClient<Channel>, AdminError> {
    let p = path.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:0")
        .map_err(|e| AdminError::Connect {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|e| AdminError::Connect {
            path: path.to_path_buf(),
            message: std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string()),
        })?;
    Ok(AgentAdminClient::new(channel))
}
