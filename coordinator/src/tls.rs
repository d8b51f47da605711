//! Mutual TLS for every rollout connection, and per-RPC role checks.
//!
//! [`server_tls`] builds a tonic server configuration that verifies every
//! client certificate against the rollout CA; [`client_tls`] builds the
//! matching client side. A client certificate is *optional* at the TLS layer,
//! only so that `JoinService.Join` (an agent that has no certificate yet,
//! holding a join token) can be reached: every other handler calls
//! [`require_role`], which refuses a connection without a certificate
//! (`Unauthenticated`) or with the wrong role (`PermissionDenied`). The role is
//! read from the Subject OU and the name from the Subject CN of the verified
//! client certificate (encoding described in [`crate::pki`]). A certificate
//! from another CA, or an expired one, still fails the handshake.
//!
//! rustls runs with the ring provider only; call [`install_crypto_provider`]
//! once at start. With TLS 1.3 a client whose certificate the server rejects
//! (foreign CA, expired, none) may still complete `connect()`: the failure shows
//! on its first RPC.

use tonic::transport::{Certificate, ClientTlsConfig, ServerTlsConfig};
use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::Role;

/// Installs rustls' ring crypto provider as the process default. Idempotent:
/// a second call (or a provider installed elsewhere) is not an error.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Server TLS: presents `cert_pem`/`key_pem` and verifies every client
/// certificate against `ca_pem`. A client may present none (to call
/// `JoinService.Join`); every other RPC refuses it in [`require_role`].
pub fn server_tls(
    ca_pem: impl AsRef<[u8]>,
    cert_pem: impl AsRef<[u8]>,
    key_pem: impl AsRef<[u8]>,
) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem))
        .client_ca_root(Certificate::from_pem(ca_pem))
        .client_auth_optional(true)
}

/// Client TLS: trusts only `ca_pem` for the server and presents
/// `cert_pem`/`key_pem`. `domain` overrides the name checked against the
/// server certificate (default: the host of the endpoint URI; the coordinator
/// certificate always covers `localhost` and `127.0.0.1`).
pub fn client_tls(
    ca_pem: impl AsRef<[u8]>,
    cert_pem: impl AsRef<[u8]>,
    key_pem: impl AsRef<[u8]>,
    domain: Option<&str>,
) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
    match domain {
        Some(d) => tls.domain_name(d),
        None => tls,
    }
}

/// Who is on the other end of a connection, from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The role (Subject OU).
    pub role: Role,
    /// The identity (Subject CN): a host name for agents.
    pub name: String,
    /// The certificate's serial number (lowercase hex): tells apart the
    /// certificates of one host, so a removed host's old certificates stay
    /// refused while the one from a new join is admitted.
    pub serial: String,
}

impl Identity {
    /// Reads role and name from a DER certificate. The certificate must carry
    /// exactly one rollout role OU and exactly one non-empty CN.
    pub fn from_der(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
        let subject = cert.subject();
        let mut roles = subject
            .iter_organizational_unit()
            .filter_map(|a| a.as_str().ok())
            .filter_map(Role::from_ou);
        let role = match (roles.next(), roles.next()) {
            (Some(r), None) => r,
            (None, _) => {
                return Err(format!(
                    "the certificate ({subject}) carries no rollout role; use a certificate \
                     issued by `rollout certs init` or `rollout-agent join`"
                ));
            }
            (Some(_), Some(_)) => {
                return Err(format!(
                    "the certificate ({subject}) carries more than one rollout role"
                ));
            }
        };
        let mut cns = subject.iter_common_name();
        let name = match (cns.next(), cns.next()) {
            (Some(cn), None) => cn
                .as_str()
                .map_err(|e| format!("the certificate's common name is not text: {e}"))?
                .to_string(),
            _ => {
                return Err(format!(
                    "the certificate ({subject}) must have exactly one common name"
                ));
            }
        };
        if name.is_empty() {
            return Err("the certificate's common name is empty".to_string());
        }
        Ok(Identity {
            role,
            name,
            serial: hex::encode(cert.raw_serial()),
        })
    }

    /// Reads role and name from the first certificate of a PEM text.
    pub fn from_pem(pem: &str) -> Result<Identity, String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| format!("not a PEM certificate: {e}"))?;
        Identity::from_der(&pem.contents)
    }

    /// Checks that this identity may speak for `host`: it must be an agent
    /// certificate whose name is `host`.
    pub fn check_host(&self, host: &str) -> Result<(), Status> {
        if self.role != Role::Agent {
            return Err(Status::permission_denied(format!(
                "{} certificate {:?} cannot pose as an agent; agents use their own certificate \
                 from `rollout-agent join`",
                self.role.as_str(),
                self.name
            )));
        }
        if self.name != host {
            return Err(Status::permission_denied(format!(
                "the agent certificate for host {:?} cannot speak for host {host:?}; an agent \
                 may only report for the host named in its certificate",
                self.name
            )));
        }
        Ok(())
    }
}

/// The identity of the client of `req`, from its TLS client certificate.
///
/// `Unauthenticated` when the connection has no client certificate (plaintext
/// or a non-TCP transport) or the certificate carries no rollout identity.
pub fn peer_identity<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated(
            "no client certificate: connect over mutual TLS with a certificate from \
             `rollout certs init` (operators) or `rollout-agent join` (agents)",
        )
    })?;
    let first = certs.first().ok_or_else(|| {
        Status::unauthenticated(
            "the client presented an empty certificate chain; use a certificate from \
             `rollout certs init` or `rollout-agent join`",
        )
    })?;
    Identity::from_der(first)
        .map_err(|e| Status::unauthenticated(format!("client certificate not accepted: {e}")))
}

/// Like [`peer_identity`], and `PermissionDenied` unless the caller's role is
/// one of `allowed`; the message names the role presented and the one needed.
pub fn require_role<T>(req: &Request<T>, allowed: &[Role]) -> Result<Identity, Status> {
    let id = peer_identity(req)?;
    check_role(&id, allowed)?;
    Ok(id)
}

/// The role check of [`require_role`] on an identity already read.
pub fn check_role(id: &Identity, allowed: &[Role]) -> Result<(), Status> {
    if allowed.contains(&id.role) {
        return Ok(());
    }
    let needed = allowed
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    let hint = if allowed.contains(&Role::Operator) {
        "; use the operator certificate from `rollout certs init`"
    } else if allowed.contains(&Role::Agent) {
        "; only agents may call it, each with its own certificate from `rollout-agent join`"
    } else if allowed.contains(&Role::Coordinator) {
        "; only the coordinator may call it"
    } else {
        ""
    };
    let article = |r: Role| if r == Role::Coordinator { "a" } else { "an" };
    let api = match allowed.first() {
        Some(Role::Operator) => "the control API",
        Some(Role::Agent) => "the agent API",
        _ => "this API",
    };
    Err(Status::permission_denied(format!(
        "{} {} certificate ({:?}) cannot call {api}: it requires {} {needed} certificate{hint}",
        article(id.role),
        id.role.as_str(),
        id.name,
        allowed.first().map_or("a", |r| article(*r)),
    )))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use rollout_proto::pb;
    use rollout_proto::pb::agent_admin_client::AgentAdminClient;
    use rollout_proto::pb::agent_admin_server::{AgentAdmin, AgentAdminServer};
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::{Endpoint, Server};
    use tonic::{Code, Response};

    use super::*;
    use crate::pki::{self, Validity};

    /// A stand-in gRPC service: `status` is operator-only and echoes the caller.
    #[derive(Debug)]
    struct TestAdmin;

    #[tonic::async_trait]
    impl AgentAdmin for TestAdmin {
        async fn status(
            &self,
            req: Request<pb::StatusRequest>,
        ) -> Result<Response<pb::StatusResponse>, Status> {
            let id = require_role(&req, &[Role::Operator])?;
            Ok(Response::new(pb::StatusResponse {
                host: id.name,
                ..Default::default()
            }))
        }

        async fn releases(
            &self,
            _: Request<pb::ReleasesRequest>,
        ) -> Result<Response<pb::ReleasesResponse>, Status> {
            Err(Status::unimplemented("test service"))
        }

        async fn rollback(
            &self,
            _: Request<pb::AdminRollbackRequest>,
        ) -> Result<Response<pb::AdminRollbackResponse>, Status> {
            Err(Status::unimplemented("test service"))
        }
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).expect("read pem")
    }

    /// Starts the test service with the coordinator certificate of `dir`.
    async fn serve(dir: &Path) -> SocketAddr {
        install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let coord = pki::coordinator_paths(dir);
        let tls = server_tls(
            read(&pki::ca_paths(dir).cert),
            read(&coord.cert),
            read(&coord.key),
        );
        let server = Server::builder()
            .tls_config(tls)
            .expect("server tls")
            .add_service(AgentAdminServer::new(TestAdmin))
            .serve_with_incoming(TcpIncoming::from(listener));
        tokio::spawn(server);
        addr
    }

    /// Makes the first RPC over a lazily connected channel, so a TLS rejection
    /// surfaces as the call's error whether or not `connect()` would succeed.
    async fn first_call(addr: SocketAddr, tls: ClientTlsConfig) -> Result<String, Status> {
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
            .expect("endpoint")
            .tls_config(tls)
            .expect("client tls")
            .connect_lazy();
        let mut client = AgentAdminClient::new(channel);
        let res =
            tokio::time::timeout(Duration::from_secs(20), client.status(pb::StatusRequest {}))
                .await
                .expect("the first call must not hang")?;
        Ok(res.into_inner().host)
    }

    /// The handshake (not a handler) refused the client: a handler would have
    /// answered `Unauthenticated` or `PermissionDenied`.
    fn assert_rejected_by_tls(err: &Status) {
        assert!(
            !matches!(
                err.code(),
                Code::Ok | Code::Unauthenticated | Code::PermissionDenied
            ),
            "expected a TLS-level failure, got {err:?}"
        );
    }

    fn pair_tls(dir: &Path, paths: &pki::CertPaths, domain: Option<&str>) -> ClientTlsConfig {
        client_tls(
            read(&pki::ca_paths(dir).cert),
            read(&paths.cert),
            read(&paths.key),
            domain,
        )
    }

    #[tokio::test]
    async fn tls_operator_certificate_is_accepted_and_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        pki::init(tmp.path(), &[], &[]).expect("init");
        let addr = serve(tmp.path()).await;
        let op = pki::operator_paths(tmp.path());
        // Server name checked against the 127.0.0.1 IP SAN …
        let host = first_call(addr, pair_tls(tmp.path(), &op, None))
            .await
            .expect("operator call");
        assert_eq!(host, "operator");
        // … and against the localhost DNS SAN.
        let host = first_call(addr, pair_tls(tmp.path(), &op, Some("localhost")))
            .await
            .expect("operator call via localhost");
        assert_eq!(host, "operator");
    }

    #[tokio::test]
    async fn tls_agent_certificate_cannot_call_the_control_api() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = pki::init(tmp.path(), &[], &["web-1".to_string()]).expect("init");
        let addr = serve(tmp.path()).await;
        let err = first_call(addr, pair_tls(tmp.path(), &out.agents[0].1, None))
            .await
            .expect_err("agent must be refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let msg = err.message();
        assert!(msg.contains("agent certificate"), "{msg}");
        assert!(msg.contains("web-1"), "{msg}");
        assert!(msg.contains("operator certificate"), "{msg}");
        assert!(msg.contains("rollout certs init"), "{msg}");
    }

    #[tokio::test]
    async fn tls_certificate_from_another_ca_fails_on_first_call() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ours = tmp.path().join("ours");
        let theirs = tmp.path().join("theirs");
        pki::init(&ours, &[], &[]).expect("init ours");
        pki::init(&theirs, &[], &[]).expect("init theirs");
        let addr = serve(&ours).await;
        // Trusts our CA for the server, but presents a foreign operator cert.
        let foreign = pki::operator_paths(&theirs);
        let tls = client_tls(
            read(&pki::ca_paths(&ours).cert),
            read(&foreign.cert),
            read(&foreign.key),
            None,
        );
        let err = first_call(addr, tls)
            .await
            .expect_err("foreign CA must be refused");
        assert_rejected_by_tls(&err);
    }

    #[tokio::test]
    async fn tls_client_without_certificate_is_refused_by_the_role_check() {
        let tmp = tempfile::tempdir().expect("tempdir");
        pki::init(tmp.path(), &[], &[]).expect("init");
        let addr = serve(tmp.path()).await;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&pki::ca_paths(tmp.path()).cert)));
        // The handshake lets it in (for JoinService.Join); the handler does not.
        let err = first_call(addr, tls)
            .await
            .expect_err("no client certificate must be refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("no client certificate"), "{err:?}");
    }

    #[tokio::test]
    async fn tls_expired_certificate_fails_on_first_call() {
        let tmp = tempfile::tempdir().expect("tempdir");
        pki::init(tmp.path(), &[], &[]).expect("init");
        let addr = serve(tmp.path()).await;
        let ca = pki::load_ca(tmp.path()).expect("ca");
        let day = Duration::from_secs(24 * 3600);
        let now = SystemTime::now();
        let (cert, key) = ca
            .issue(
                Role::Operator,
                "operator",
                &[],
                Validity::between(now - 3 * day, now - day),
            )
            .expect("issue expired");
        let tls = client_tls(&ca.cert_pem, cert, key, None);
        let err = first_call(addr, tls)
            .await
            .expect_err("expired certificate must be refused");
        assert_rejected_by_tls(&err);
    }

    #[test]
    fn tls_identity_reads_role_and_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = pki::init(tmp.path(), &[], &["db-1".to_string()]).expect("init");
        let id = Identity::from_pem(&read(&out.agents[0].1.cert)).expect("agent id");
        assert_eq!((id.role, id.name.as_str()), (Role::Agent, "db-1"));
        assert!(!id.serial.is_empty());
        let id = Identity::from_pem(&read(&out.coordinator.cert)).expect("coord id");
        assert_eq!(id.role, Role::Coordinator);
        // The CA has no role and can never pass as a peer.
        let err = Identity::from_pem(&read(&out.ca.cert)).expect_err("CA has no role");
        assert!(err.contains("no rollout role"), "{err}");
        assert!(Identity::from_der(b"garbage").is_err());
    }

    #[test]
    fn tls_role_and_host_checks_name_both_sides() {
        let op = Identity {
            role: Role::Operator,
            name: "operator".into(),
            serial: "01".into(),
        };
        let agent = Identity {
            role: Role::Agent,
            name: "web-1".into(),
            serial: "02".into(),
        };
        assert!(check_role(&op, &[Role::Operator]).is_ok());
        let err = check_role(&op, &[Role::Agent]).expect_err("operator is no agent");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("operator certificate"), "{err:?}");
        assert!(err.message().contains("requires an agent"), "{err:?}");

        assert!(agent.check_host("web-1").is_ok());
        let err = agent.check_host("web-2").expect_err("other host");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("web-2"), "{err:?}");
        let err = op
            .check_host("web-1")
            .expect_err("operator posing as agent");
        assert_eq!(err.code(), Code::PermissionDenied);
    }
}
