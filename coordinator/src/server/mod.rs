//! The coordinator daemon: agent, control and join services on one listener,
//! over mTLS (plaintext only with `--insecure-dev`). A client certificate is
//! optional at the TLS layer only so that `JoinService.Join` can be reached;
//! every agent and control RPC checks the caller's certificate and role.
//!
//! HTTP/2 pings go to every client each `[agents] keepalive_interval`; a
//! connection whose ping is unanswered for `keepalive_timeout` is closed, so
//! an agent cut off by a silent partition or frozen (SIGSTOP) ends its stream
//! and its commands in flight fail as unreachable within their sum, instead of
//! waiting for the command's own timeout.

pub mod agent_service;
pub mod control_service;
pub mod join_service;

use std::sync::Arc;

use rollout_proto::pb::agent_service_server::AgentServiceServer;
use rollout_proto::pb::control_service_server::ControlServiceServer;
use rollout_proto::pb::join_service_server::JoinServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tracing::info;

use crate::artifacts::Artifacts;
use crate::config::CoordinatorConfig;
use crate::engine::Engine;
use crate::fleet::Fleet;
use crate::store::Store;

/// Why the coordinator stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No TLS and no `--insecure-dev`.
    #[error(
        "no [tls] section in the config: the coordinator only serves mutual TLS; run `rollout certs init --dir DIR` and point [tls] ca/cert/key at it (or pass --insecure-dev for a throw-away local setup)"
    )]
    NoTls,
    /// TLS files unreadable.
    #[error("read {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// `[tls] ca_key` is unusable.
    #[error(
        "[tls] ca_key {path}: {source}; ca_key must be the ca.key from the same `rollout certs init` as [tls] ca (or drop ca_key to turn joining off)"
    )]
    CaKey {
        /// The key file.
        path: String,
        /// Why.
        source: crate::pki::PkiError,
    },
    /// Store failure.
    #[error("{0}; is another coordinator using the same data directory?")]
    Store(#[from] crate::store::StoreError),
    /// Engine failure.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// Transport failure.
    #[error("serve: {0}")]
    Transport(String),
}

/// Runs the coordinator on `listener` until `cancel`.
pub async fn run(
    listener: TcpListener,
    config: CoordinatorConfig,
    insecure_dev: bool,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let tls = match (&config.tls, insecure_dev) {
        (Some(t), _) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|source| ServeError::Read {
                    path: p.display().to_string(),
                    source,
                })
            };
            Some(crate::tls::server_tls(
                &read(&t.ca)?,
                &read(&t.cert)?,
                &read(&t.key)?,
            ))
        }
        (None, true) => None,
        (None, false) => return Err(ServeError::NoTls),
    };
    let ca = match config
        .tls
        .as_ref()
        .and_then(|t| Some((t, t.ca_key.as_ref()?)))
    {
        Some((t, key)) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|source| ServeError::Read {
                    path: p.display().to_string(),
                    source,
                })
            };
            let ca = crate::pki::Ca::from_pem(read(&t.ca)?, read(key)?).map_err(|source| {
                ServeError::CaKey {
                    path: key.display().to_string(),
                    source,
                }
            })?;
            Some(Arc::new(ca))
        }
        None => None,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::Read {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let store = Store::open(&config.data_dir.join("state"))?.with_crash_at(config.crash_at.clone());
    let fleet = Arc::new(Fleet::new(store.clone()));
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = crate::metrics::bind(addr)
                .await
                .map_err(|e| ServeError::Transport(format!("metrics_listen {addr}: {e}")))?;
            let metrics = Arc::new(crate::metrics::Metrics::new());
            fleet.metrics().set(metrics.clone());
            Some((listener, metrics))
        }
        None => None,
    };
    let artifacts = Artifacts::new(config.data_dir.join("artifacts"), config.max_artifact_bytes)
        .with_chunk_cache(config.artifact_cache_bytes);
    let engine = Engine::new(
        store,
        fleet.clone(),
        artifacts.clone(),
        cancel.child_token(),
    );
    engine.resume_all()?;
    engine.spawn_reconciler();
    {
        // A clean stop ends the agents' streams, else it would wait on them.
        let (fleet, cancel) = (fleet.clone(), cancel.clone());
        tokio::spawn(async move {
            cancel.cancelled().await;
            fleet.close_all();
        });
    }
    if let Some((listener, metrics)) = metrics {
        info!(addr = ?listener.local_addr().ok(), "serving Prometheus metrics on /metrics");
        let (engine, cancel) = (engine.clone(), cancel.child_token());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, metrics, engine, cancel).await {
                tracing::warn!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    let secure = tls.is_some();
    let join = join_service::JoinApi {
        fleet: fleet.clone(),
        store: engine.store().clone(),
        ca,
        tls: secure,
    };
    let agent = agent_service::AgentApi {
        fleet,
        artifacts: artifacts.clone(),
        tls: secure,
    };
    let control = control_service::ControlApi {
        engine: engine.clone(),
        artifacts,
        tls: secure,
        joining: join.ca.is_some(),
    };
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.agent_keepalive.interval))
        .http2_keepalive_timeout(Some(config.agent_keepalive.timeout));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| ServeError::Transport(e.to_string()))?;
    }
    info!(addr = ?listener.local_addr().ok(), tls = secure, joining = join.ca.is_some(), "coordinator listening");
    let max = rollout_proto::MAX_MESSAGE_BYTES;
    let result = builder
        .add_service(AgentServiceServer::new(agent).max_decoding_message_size(max))
        .add_service(ControlServiceServer::new(control).max_decoding_message_size(max))
        .add_service(JoinServiceServer::new(join).max_decoding_message_size(max))
        .serve_with_incoming_shutdown(incoming(listener), cancel.clone().cancelled_owned())
        .await
        .map_err(|e| ServeError::Transport(e.to_string()));
    engine.shutdown().await;
    result
}

/// The connections `listener` accepts, each with TCP_NODELAY: commands and
/// answers are small messages that must not wait for the peer's ACK (Nagle's
/// algorithm), and tonic sets it only on listeners it binds itself.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let conn = tokio::time::timeout(std::time::Duration::from_secs(10), accepted.next())
            .await
            .expect("a connection within 10 s")
            .expect("the listener is open")
            .expect("accept");
        assert!(conn.nodelay().expect("read TCP_NODELAY"));
    }
}
