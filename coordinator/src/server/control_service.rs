//! `ControlService`: the operator API. With TLS, only operator certificates
//! may call it. Join tokens and host removal live in [`super::join_service`]
//! beside the `Join` RPC they belong to.
//!
//! `Ping` sends a `Ping` command down every selected host's stream at once
//! (the same round-trip as rollout commands, matched by command id) and
//! returns each host's round-trip time and the fan-out's wall time.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use rollout_proto::pb;
use rollout_proto::pb::control_service_server::ControlService;
use rollout_proto::pb::coordinator_message::Cmd;
use tonic::{Request, Response, Status, Streaming};

use crate::artifacts::Artifacts;
use crate::engine::Engine;
use crate::fleet::Fleet;
use crate::pki::Role;

/// The operator-facing service.
#[derive(Debug, Clone)]
pub struct ControlApi {
    /// The rollout engine.
    pub engine: Arc<Engine>,
    /// Artifact files.
    pub artifacts: Artifacts,
    /// Whether peers present certificates (false only with `--insecure-dev`).
    pub tls: bool,
    /// Whether the coordinator can sign joining agents (`[tls] ca_key`); a
    /// join token is refused without it.
    pub joining: bool,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Time a `Ping` allows each host when the request names none.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a `Ping` may allow each host.
pub const MAX_PING_TIMEOUT: Duration = Duration::from_secs(300);

/// Pings `hosts` (empty: every connected host) concurrently over their
/// agent streams; one entry per host, in name order.
pub async fn ping(fleet: &Fleet, r: pb::PingRequest) -> Result<pb::PingResponse, Status> {
    let timeout = match r.timeout_ms {
        0 => DEFAULT_PING_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    if timeout > MAX_PING_TIMEOUT {
        return Err(Status::invalid_argument(format!(
            "ping timeout {timeout:?} is over the limit of {MAX_PING_TIMEOUT:?}; pass a shorter --timeout"
        )));
    }
    let hosts: Vec<String> = if r.hosts.is_empty() {
        let all = fleet.connected_hosts();
        if all.is_empty() {
            return Err(Status::failed_precondition(
                "no host is connected to the coordinator; `rollout hosts` lists the hosts it knows",
            ));
        }
        all
    } else {
        let mut named: Vec<String> = r.hosts.clone();
        named.sort();
        named.dedup();
        if let Some(h) = named.iter().find(|h| !fleet.knows(h)) {
            return Err(Status::not_found(format!(
                "host {h:?} is unknown to the coordinator; `rollout hosts` lists the hosts it knows"
            )));
        }
        named
    };
    let started = Instant::now();
    // Outside tokio's cooperative budget: one task drives every host's
    // command, and under the budget (128 operations per poll) the sends to
    // 10,000 hosts would be spread over dozens of polls of every pending
    // future, each returning at once to yield.
    let results = tokio::task::unconstrained(futures::future::join_all(
        hosts.into_iter().enumerate().map(|(i, host)| async move {
            let sent = Instant::now();
            let cmd = Cmd::Ping(pb::Ping { nonce: i as u64 });
            let res = fleet.command(&host, cmd, timeout).await;
            let rtt = sent.elapsed();
            match res {
                Ok(x) if x.ok => pb::HostPing {
                    host,
                    ok: true,
                    rtt_us: rtt.as_micros() as u64,
                    error: String::new(),
                },
                Ok(x) => pb::HostPing {
                    host,
                    ok: false,
                    rtt_us: 0,
                    error: format!("the agent refused the ping: {}", x.error),
                },
                Err(e) => pb::HostPing {
                    host,
                    ok: false,
                    rtt_us: 0,
                    error: e.to_string(),
                },
            }
        }),
    ))
    .await;
    let elapsed_us = started.elapsed().as_micros() as u64;
    Ok(pb::PingResponse {
        hosts: results,
        elapsed_us,
    })
}

/// The stored rollouts of `service` (`None`: of every service), oldest
/// first: the heads pick them, so only theirs are read whole.
fn stored_rollouts(
    engine: &Engine,
    service: Option<&str>,
) -> Result<Vec<pb::RolloutStatus>, Status> {
    let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
    let mut out = Vec::new();
    for head in engine.store().rollout_heads().map_err(internal)? {
        if service.is_some_and(|s| head.service != s) {
            continue;
        }
        if let Some(r) = engine.store().rollout(&head.id).map_err(internal)? {
            out.push(r.status());
        }
    }
    Ok(out)
}

impl ControlApi {
    fn auth<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.tls {
            crate::tls::require_role(req, &[Role::Operator])?;
        }
        Ok(())
    }
}

fn batches(b: &[Vec<String>]) -> Vec<pb::Batch> {
    b.iter()
        .enumerate()
        .map(|(i, hosts)| pb::Batch {
            index: i as u32,
            hosts: hosts
                .iter()
                .map(|h| pb::HostProgress {
                    host: h.clone(),
                    state: "pending".into(),
                    ..Default::default()
                })
                .collect(),
        })
        .collect()
}

#[tonic::async_trait]
impl ControlService for ControlApi {
    type WatchRolloutStream = BoxStream<pb::RolloutStatus>;

    async fn upload_artifact(
        &self,
        req: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        self.auth(&req)?;
        let mut s = req.into_inner();
        let mut up = self
            .artifacts
            .begin()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut expected = String::new();
        while let Some(chunk) = s.message().await? {
            if expected.is_empty() && !chunk.digest.is_empty() {
                expected = chunk.digest.clone();
            }
            up.write(&chunk.data)
                .await
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        }
        let (digest, size) = self
            .artifacts
            .finish(up, Some(&expected))
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::UploadResponse { digest, size }))
    }

    async fn deploy(
        &self,
        req: Request<pb::DeployRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        if r.dry_run {
            let (_, b) = self.engine.plan(&r.spec_toml).map_err(|e| e.to_status())?;
            return Ok(Response::new(pb::DeployResponse {
                rollout_id: String::new(),
                batches: batches(&b),
            }));
        }
        let rollout = self
            .engine
            .deploy(&r.spec_toml, &r.artifact_digest, r.artifact_size)
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::DeployResponse {
            rollout_id: rollout.id.clone(),
            batches: batches(&rollout.batches),
        }))
    }

    async fn get_rollout(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.auth(&req)?;
        let status = self
            .engine
            .status(&req.into_inner().id)
            .map_err(|e| e.to_status())?;
        Ok(Response::new(status))
    }

    async fn list_rollouts(
        &self,
        req: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.auth(&req)?;
        let svc = req.into_inner().service;
        let rollouts = stored_rollouts(&self.engine, (!svc.is_empty()).then_some(svc.as_str()))?;
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn watch_rollout(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        self.auth(&req)?;
        let id = req.into_inner().id;
        let engine = self.engine.clone();
        let mut changes = engine.subscribe();
        let first = engine.status(&id).map_err(|e| e.to_status())?;
        let stream = async_stream::try_stream! {
            let mut last = first;
            yield last.clone();
            while !last.finished {
                match changes.recv().await {
                    Ok(x) if x != id => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    _ => {}
                }
                let now = engine.status(&id).map_err(|e| e.to_status())?;
                if now != last {
                    last = now;
                    yield last.clone();
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn pause(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.auth(&req)?;
        let r = self
            .engine
            .pause(&req.into_inner().id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(r.status()))
    }

    async fn resume(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.auth(&req)?;
        let r = self
            .engine
            .resume(&req.into_inner().id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(r.status()))
    }

    async fn promote(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.auth(&req)?;
        let r = self
            .engine
            .promote(&req.into_inner().id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(r.status()))
    }

    async fn abort(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.auth(&req)?;
        let r = self
            .engine
            .abort(&req.into_inner().id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(r.status()))
    }

    async fn rollback_service(
        &self,
        req: Request<pb::RollbackServiceRequest>,
    ) -> Result<Response<pb::RollbackServiceResponse>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        let hosts = self
            .engine
            .rollback_service(&r.service, &r.to_release)
            .await;
        if hosts.is_empty() {
            return Err(Status::not_found(format!(
                "no host reports service {:?}; `rollout hosts` shows what runs where",
                r.service
            )));
        }
        Ok(Response::new(pb::RollbackServiceResponse { hosts }))
    }

    async fn list_hosts(
        &self,
        req: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        self.auth(&req)?;
        Ok(Response::new(pb::ListHostsResponse {
            hosts: self.engine.fleet().hosts(),
        }))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.auth(&req)?;
        let svc = req.into_inner().service;
        let hosts = self
            .engine
            .fleet()
            .hosts()
            .into_iter()
            .filter_map(|h| {
                let s = h
                    .report
                    .as_ref()?
                    .services
                    .iter()
                    .find(|s| s.service == svc)?
                    .clone();
                Some(pb::HostHistory {
                    host: h.host,
                    entries: s.recent,
                })
            })
            .collect();
        let rollouts = stored_rollouts(&self.engine, Some(&svc))?;
        Ok(Response::new(pb::HistoryResponse { hosts, rollouts }))
    }

    async fn events(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::EventsResponse>, Status> {
        self.auth(&req)?;
        let id = req.into_inner().id;
        self.engine.get(&id).map_err(|e| e.to_status())?;
        let events = self
            .engine
            .store()
            .events(&id)
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|e| pb::RolloutEvent {
                seq: e.seq,
                at_ms: e.at_ms,
                host: e.host.unwrap_or_default(),
                kind: e.kind,
                message: e.message,
            })
            .collect();
        Ok(Response::new(pb::EventsResponse { events }))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.auth(&req)?;
        if !self.joining {
            return Err(super::join_service::joining_off(self.tls));
        }
        super::join_service::create_token(self.engine.store(), req.into_inner()).map(Response::new)
    }

    async fn remove_host(
        &self,
        req: Request<pb::RemoveHostRequest>,
    ) -> Result<Response<pb::RemoveHostResponse>, Status> {
        self.auth(&req)?;
        super::join_service::remove_host(self.engine.fleet(), req.into_inner()).map(Response::new)
    }

    async fn ping(
        &self,
        req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        self.auth(&req)?;
        ping(self.engine.fleet(), req.into_inner())
            .await
            .map(Response::new)
    }
}
