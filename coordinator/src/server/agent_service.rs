//! `AgentService`: agents' `Connect` streams and artifact downloads.
//!
//! With TLS, an agent speaks only for the host named in its certificate: a
//! hello for another host is refused; so is every call with the certificate
//! of a removed host (`rollout hosts remove`).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use rollout_proto::pb;
use rollout_proto::pb::agent_service_server::AgentService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use crate::artifacts::Artifacts;
use crate::fleet::Fleet;
use crate::pki::Role;
use crate::tls::Identity;

/// The agent-facing service.
#[derive(Debug, Clone)]
pub struct AgentApi {
    /// Registry.
    pub fleet: Arc<Fleet>,
    /// Artifact files.
    pub artifacts: Artifacts,
    /// Whether peers present certificates (false only with `--insecure-dev`).
    pub tls: bool,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl AgentApi {
    fn identity<T>(&self, req: &Request<T>) -> Result<Option<Identity>, Status> {
        if !self.tls {
            return Ok(None);
        }
        let id = crate::tls::require_role(req, &[Role::Agent])?;
        self.fleet.admit(&id)?;
        Ok(Some(id))
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ConnectStream = BoxStream<pb::CoordinatorMessage>;
    type FetchArtifactStream = BoxStream<pb::ArtifactChunk>;

    async fn connect(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let cert = self.identity(&req)?;
        let address = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream must start with a hello"))?;
        let Some(pb::agent_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument(
                "the stream must start with a hello",
            ));
        };
        if let Some(id) = &cert {
            let name = &id.name;
            if name != &hello.host {
                return Err(Status::permission_denied(format!(
                    "the certificate is for host {name:?} but the hello speaks for {:?}; an agent may only speak for its own host (set host = {name:?} in its config)",
                    hello.host
                )));
            }
            // Again, right before registering: the host may have been removed
            // while the hello was on its way.
            self.fleet.admit(id)?;
        }
        let host = hello.host.clone();
        let (tx, rx) = mpsc::channel(256);
        let session = self.fleet.register(&hello, address, tx);
        let fleet = self.fleet.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => match m.msg {
                        Some(pb::agent_message::Msg::Report(r)) => fleet.on_report(&host, r),
                        Some(pb::agent_message::Msg::Result(r)) => fleet.on_result(&host, r),
                        Some(pb::agent_message::Msg::Progress(_)) => {}
                        Some(pb::agent_message::Msg::Hello(_)) | None => {
                            warn!(host = %host, "unexpected message on an established stream");
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        warn!(host = %host, error = %e.message(), "agent stream error");
                        break;
                    }
                }
            }
            fleet.unregister(&host, session);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| *m))))
    }

    async fn fetch_artifact(
        &self,
        req: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        self.identity(&req)?;
        let r = req.into_inner();
        let file = self
            .artifacts
            .open(&r.digest, r.offset)
            .await
            .map_err(|e| match e {
                crate::artifacts::ArtifactError::Missing(_) => Status::not_found(e.to_string()),
                crate::artifacts::ArtifactError::BadDigest(_) => {
                    Status::invalid_argument(e.to_string())
                }
                _ => Status::internal(e.to_string()),
            })?;
        let fleet = self.fleet.clone();
        let artifacts = self.artifacts.clone();
        fleet.metrics().artifact_fetch();
        let chunks = artifacts.download(r.digest, file, r.offset);
        let stream = async_stream::try_stream! {
            for await chunk in chunks {
                let chunk = chunk.map_err(|e| Status::internal(e.to_string()))?;
                fleet.metrics().artifact_read(chunk.read_from_disk);
                fleet.metrics().artifact_sent(chunk.data.len());
                yield pb::ArtifactChunk { data: chunk.data };
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
