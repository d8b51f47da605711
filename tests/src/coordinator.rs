//! A fake coordinator that speaks the real `AgentService` protocol over
//! plaintext gRPC on 127.0.0.1: accepts agents' `Connect` streams, serves
//! artifacts by digest, sends commands and collects results and reports.
//! It drives agents in tests until the real coordinator exists.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::Stream;
use rollout_proto::pb;
use rollout_proto::pb::agent_service_server::{AgentService, AgentServiceServer};
use rollout_proto::pb::coordinator_message::Cmd;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
struct State {
    artifacts: HashMap<String, Arc<Vec<u8>>>,
    agents: HashMap<String, mpsc::Sender<Result<pb::CoordinatorMessage, Status>>>,
    hellos: HashMap<String, Vec<pb::Hello>>,
    results: HashMap<String, pb::CommandResult>,
    reports: HashMap<String, Vec<pb::Report>>,
    fetches: usize,
}

#[derive(Clone, Default)]
struct Shared {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.state.lock().expect("state lock");
        let out = f(&mut s);
        drop(s);
        self.notify.notify_waiters();
        out
    }
}

struct Service {
    shared: Shared,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Service {
    type ConnectStream = BoxStream<pb::CoordinatorMessage>;
    type FetchArtifactStream = BoxStream<pb::ArtifactChunk>;

    async fn connect(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let Some(pb::agent_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("first message must be hello"));
        };
        let host = hello.host.clone();
        let (tx, rx) = mpsc::channel(64);
        self.shared.with(|s| {
            s.agents.insert(host.clone(), tx);
            s.hellos.entry(host.clone()).or_default().push(hello);
        });
        let shared = self.shared.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(pb::agent_message::Msg::Result(r)) => shared.with(|s| {
                        s.results.insert(r.command_id.clone(), r);
                    }),
                    Some(pb::agent_message::Msg::Report(r)) => shared.with(|s| {
                        s.reports.entry(host.clone()).or_default().push(r);
                    }),
                    _ => {}
                }
            }
            shared.with(|s| {
                s.agents.remove(&host);
            });
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_artifact(
        &self,
        req: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let r = req.into_inner();
        let data = self
            .shared
            .with(|s| {
                s.fetches += 1;
                s.artifacts.get(&r.digest).cloned()
            })
            .ok_or_else(|| Status::not_found(format!("no artifact {}", r.digest)))?;
        let offset = usize::try_from(r.offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let chunks: Vec<Result<pb::ArtifactChunk, Status>> = data[offset..]
            .chunks(64 * 1024)
            .map(|c| {
                Ok(pb::ArtifactChunk {
                    data: c.to_vec().into(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// The fake coordinator.
pub struct FakeCoordinator {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Shared,
    server: Option<JoinHandle<()>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for FakeCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCoordinator")
            .field("addr", &self.addr)
            .finish()
    }
}

impl FakeCoordinator {
    /// Listens on 127.0.0.1 on a free port.
    pub async fn start() -> Result<FakeCoordinator> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Shared::default();
        let mut c = FakeCoordinator {
            addr,
            shared,
            server: None,
            next_id: std::sync::atomic::AtomicU64::new(1),
        };
        c.serve(listener);
        Ok(c)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let svc = Service {
            shared: self.shared.clone(),
        };
        self.server = Some(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(svc))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        }));
    }

    /// `http://addr` for agent configs.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and drops every agent stream (the coordinator "vanishes").
    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        self.shared.with(|s| s.agents.clear());
    }

    /// Serves an artifact; returns its digest.
    pub fn add_artifact(&self, data: Vec<u8>) -> String {
        let d = crate::digest_of(&data);
        self.add_artifact_as(&d, data);
        d
    }

    /// Serves `data` under a digest it may not match.
    pub fn add_artifact_as(&self, digest: &str, data: Vec<u8>) {
        self.shared.with(|s| {
            s.artifacts.insert(digest.to_string(), Arc::new(data));
        });
    }

    /// How many artifact fetches were served.
    pub fn fetches(&self) -> usize {
        self.shared.with(|s| s.fetches)
    }

    /// How many hellos `host` sent (one per connection).
    pub fn hello_count(&self, host: &str) -> usize {
        self.shared.with(|s| s.hellos.get(host).map_or(0, Vec::len))
    }

    /// The most recent hello of `host`.
    pub fn last_hello(&self, host: &str) -> Option<pb::Hello> {
        self.shared
            .with(|s| s.hellos.get(host).and_then(|v| v.last().cloned()))
    }

    /// Waits until `host` has a live stream and has said hello `n` times.
    pub async fn wait_connected(&self, host: &str, n: usize) -> Result<()> {
        crate::eventually(
            &format!("{host} connected ({n} hellos)"),
            crate::DEADLINE,
            async || {
                self.shared
                    .with(|s| {
                        s.agents.contains_key(host) && s.hellos.get(host).map_or(0, Vec::len) >= n
                    })
                    .then_some(())
            },
        )
        .await
    }

    /// Sends a command and waits for its result.
    pub async fn command(&self, host: &str, cmd: Cmd) -> Result<pb::CommandResult> {
        let id = format!(
            "cmd-{}",
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let tx = self
            .shared
            .with(|s| s.agents.get(host).cloned())
            .with_context(|| format!("{host} is not connected"))?;
        tx.send(Ok(pb::CoordinatorMessage {
            command_id: id.clone(),
            cmd: Some(cmd),
        }))
        .await
        .context("send command")?;
        crate::eventually(
            &format!("result of {id}"),
            Duration::from_secs(60),
            async || self.shared.with(|s| s.results.get(&id).cloned()),
        )
        .await
    }

    /// Sends a command and does not wait (e.g. when the agent will crash).
    pub async fn send(&self, host: &str, cmd: Cmd) -> Result<()> {
        let tx = self
            .shared
            .with(|s| s.agents.get(host).cloned())
            .with_context(|| format!("{host} is not connected"))?;
        let id = format!(
            "cmd-{}",
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        tx.send(Ok(pb::CoordinatorMessage {
            command_id: id,
            cmd: Some(cmd),
        }))
        .await
        .context("send command")?;
        Ok(())
    }

    /// Stage, and fail unless it succeeds.
    pub async fn stage(&self, host: &str, def: pb::ServiceDefinition) -> Result<pb::CommandResult> {
        let r = self
            .command(
                host,
                Cmd::Stage(pb::Stage {
                    definition: Some(def),
                }),
            )
            .await?;
        if !r.ok {
            bail!("stage failed: {}", r.error);
        }
        Ok(r)
    }

    /// Activate; returns the result whatever it is.
    pub async fn activate(
        &self,
        host: &str,
        service: &str,
        release: &str,
    ) -> Result<pb::CommandResult> {
        self.command(
            host,
            Cmd::Activate(pb::Activate {
                service: service.into(),
                release: release.into(),
                cause: "test-rollout".into(),
            }),
        )
        .await
    }

    /// Commit, and fail unless it succeeds.
    pub async fn commit(
        &self,
        host: &str,
        service: &str,
        release: &str,
    ) -> Result<pb::CommandResult> {
        let r = self
            .command(
                host,
                Cmd::Commit(pb::Commit {
                    service: service.into(),
                    release: release.into(),
                }),
            )
            .await?;
        if !r.ok {
            bail!("commit failed: {}", r.error);
        }
        Ok(r)
    }
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        self.stop();
    }
}
