//! `JoinService.Join`, the one RPC callable without a client certificate, and
//! the operator side of joining: `CreateToken` and `RemoveHost` (routed here
//! from the control service, which checks the operator role first).
//!
//! A join: the host name and the CSR are checked (so a malformed request does
//! not spend the token), then the token is spent (checked and marked used in
//! one compare-and-swap, flushed), then the CSR's key is signed as an agent
//! certificate whose CN is the host; if the host had been removed, the new
//! certificate's serial is admitted. The token's labels go back to the agent,
//! which writes them into the config it generates (its `[labels]` stay the
//! source of truth for targeting).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rollout_proto::pb;
use rollout_proto::pb::join_service_server::JoinService;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::engine::model::now_ms;
use crate::fleet::Fleet;
use crate::join::{self, TokenRecord};
use crate::pki::{self, Ca, Role, Validity};
use crate::store::Store;
use crate::tls::Identity;

/// The join service.
#[derive(Debug, Clone)]
pub struct JoinApi {
    /// Registry (admits a re-joined host's new certificate).
    pub fleet: Arc<Fleet>,
    /// Where tokens are spent.
    pub store: Store,
    /// The CA that signs joining agents; `None`: joining is off (no
    /// `[tls] ca_key`, or `--insecure-dev`).
    pub ca: Option<Arc<Ca>>,
    /// Whether the coordinator serves TLS (false only with `--insecure-dev`).
    pub tls: bool,
}

/// `FailedPrecondition` for a join (or a token) on a coordinator that cannot
/// sign: how to turn joining on.
pub fn joining_off(tls: bool) -> Status {
    Status::failed_precondition(if tls {
        "joining is off on this coordinator: it has no CA key to sign agents' keys with; add \
         `ca_key = \"/path/to/ca.key\"` (the ca.key from `rollout certs init`) to the [tls] \
         section of coordinator.toml and restart it, or issue the host's files offline with \
         `rollout certs init --agent NAME`"
    } else {
        "joining is off: the coordinator runs with --insecure-dev and issues no identities; \
         point the agent at it with insecure_dev = true instead"
    })
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl JoinService for JoinApi {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let address = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let r = req.into_inner();
        let Some(ca) = &self.ca else {
            return Err(joining_off(self.tls));
        };
        pki::validate_host_name(&r.host).map_err(|e| {
            Status::invalid_argument(format!(
                "--host: {e}; the host name becomes the certificate's name"
            ))
        })?;
        if r.token.trim().is_empty() {
            return Err(Status::unauthenticated(
                "no token: pass the one printed by `rollout token create`",
            ));
        }
        pki::verify_csr(&r.csr_pem).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let token = match self
            .store
            .use_token(&join::hash_token(&r.token), &r.host, now_ms())
            .map_err(internal)?
        {
            Ok(t) => t,
            Err(refusal) => {
                warn!(host = %r.host, %address, reason = %refusal, "join refused");
                return Err(refusal.to_status());
            }
        };
        let cert_pem = ca
            .sign_csr(
                &r.csr_pem,
                Role::Agent,
                &r.host,
                std::slice::from_ref(&r.host),
                Validity::leaf_default(),
            )
            .map_err(internal)?;
        let id = Identity::from_pem(&cert_pem).map_err(internal)?;
        self.fleet
            .admit_serial(&r.host, &id.serial)
            .map_err(internal)?;
        info!(host = %r.host, %address, serial = %id.serial, "agent joined with a token");
        Ok(Response::new(pb::JoinResponse {
            cert_pem,
            ca_pem: ca.cert_pem.clone(),
            labels: token.labels.into_iter().collect(),
            host: r.host,
        }))
    }
}

/// `ControlService.CreateToken` (the caller's role is already checked).
pub fn create_token(
    store: &Store,
    r: pb::CreateTokenRequest,
) -> Result<pb::CreateTokenResponse, Status> {
    let ttl = Duration::from_millis(r.ttl_ms);
    if ttl < join::MIN_TTL || ttl > join::MAX_TTL {
        return Err(Status::invalid_argument(format!(
            "--ttl {}: a token lives between {} and {}",
            humantime::format_duration(ttl),
            humantime::format_duration(join::MIN_TTL),
            humantime::format_duration(join::MAX_TTL)
        )));
    }
    let host = (!r.host.is_empty()).then_some(r.host);
    if let Some(h) = &host {
        pki::validate_host_name(h).map_err(|e| Status::invalid_argument(format!("--host: {e}")))?;
    }
    for k in r.labels.keys() {
        if k.is_empty() {
            return Err(Status::invalid_argument("--label: a label needs a key"));
        }
    }
    let token = join::generate_token();
    let now = now_ms();
    let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
    let record = TokenRecord::new(join::hash_token(&token), now, ttl, labels, host);
    store.save_token(&record, now).map_err(internal)?;
    info!(expires_at_ms = record.expires_at_ms, host = ?record.host, "join token created");
    Ok(pb::CreateTokenResponse {
        token,
        expires_at_ms: record.expires_at_ms,
    })
}

/// `ControlService.RemoveHost` (the caller's role is already checked).
pub fn remove_host(
    fleet: &Fleet,
    r: pb::RemoveHostRequest,
) -> Result<pb::RemoveHostResponse, Status> {
    pki::validate_host_name(&r.host).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let removed = fleet.remove_host(&r.host).map_err(internal)?;
    Ok(pb::RemoveHostResponse {
        host: r.host,
        was_known: removed.was_known,
        was_connected: removed.was_connected,
        removed_at_ms: removed.removed_at_ms,
    })
}
