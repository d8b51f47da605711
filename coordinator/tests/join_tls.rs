//! The coordinator's TLS surface with joining on, in process: a client
//! without a certificate reaches `JoinService.Join` and nothing else; a join
//! token admits one host once; a removed host's certificates are refused on
//! every agent RPC until it joins again.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rollout_coordinator::config::CoordinatorConfig;
use rollout_coordinator::pki::{self, Role};
use rollout_coordinator::tls::{Identity, client_tls, install_crypto_provider};
use rollout_proto::pb;
use rollout_proto::pb::agent_service_client::AgentServiceClient;
use rollout_proto::pb::control_service_client::ControlServiceClient;
use rollout_proto::pb::join_service_client::JoinServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A coordinator serving mutual TLS from a fresh PKI (with an agent
/// certificate for `web-1`), joining on when `ca_key`.
struct Coordinator {
    pki: tempfile::TempDir,
    _data: tempfile::TempDir,
    addr: SocketAddr,
    cancel: CancellationToken,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).expect("read pem")
}

impl Coordinator {
    async fn start(ca_key: bool) -> Coordinator {
        install_crypto_provider();
        let pki_dir = tempfile::tempdir().expect("tempdir");
        pki::init(pki_dir.path(), &[], &["web-1".to_string()]).expect("certs init");
        let data = tempfile::tempdir().expect("tempdir");
        let p = |f: &str| pki_dir.path().join(f).display().to_string();
        let mut text = format!(
            "data_dir = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            data.path().display().to_string(),
            p("ca.pem"),
            p("coordinator.pem"),
            p("coordinator.key"),
        );
        if ca_key {
            text.push_str(&format!("ca_key = {:?}\n", p("ca.key")));
        }
        let config = CoordinatorConfig::parse(&text, Path::new("c.toml")).expect("config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = rollout_coordinator::server::run(listener, config, false, c).await {
                panic!("coordinator stopped: {e}");
            }
        });
        Coordinator {
            pki: pki_dir,
            _data: data,
            addr,
            cancel,
        }
    }

    fn channel(&self, tls: ClientTlsConfig) -> Channel {
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.addr.port()))
            .expect("endpoint")
            .timeout(Duration::from_secs(20))
            .tls_config(tls)
            .expect("tls")
            .connect_lazy()
    }

    /// Trusts the CA, presents no certificate.
    fn anonymous(&self) -> Channel {
        self.channel(
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(
                &pki::ca_paths(self.pki.path()).cert,
            ))),
        )
    }

    fn with_cert(&self, cert: &str, key: &str) -> Channel {
        self.channel(client_tls(
            read(&pki::ca_paths(self.pki.path()).cert),
            cert,
            key,
            None,
        ))
    }

    fn operator(&self) -> ControlServiceClient<Channel> {
        let op = pki::operator_paths(self.pki.path());
        ControlServiceClient::new(self.with_cert(&read(&op.cert), &read(&op.key)))
    }

    async fn token(&self, host: &str) -> String {
        self.operator()
            .create_token(pb::CreateTokenRequest {
                ttl_ms: 600_000,
                labels: [("role".to_string(), "web".to_string())].into(),
                host: host.to_string(),
            })
            .await
            .expect("create token")
            .into_inner()
            .token
    }

    /// Joins as `host` with `token` from a client without a certificate;
    /// returns (cert, key).
    async fn join(&self, token: &str, host: &str) -> Result<(String, String), tonic::Status> {
        let (csr, key) = pki::generate_csr(host).expect("csr");
        let r = JoinServiceClient::new(self.anonymous())
            .join(pb::JoinRequest {
                token: token.to_string(),
                host: host.to_string(),
                csr_pem: csr,
            })
            .await?
            .into_inner();
        assert_eq!(r.host, host);
        assert_eq!(r.ca_pem, read(&pki::ca_paths(self.pki.path()).cert));
        assert_eq!(r.labels.get("role").map(String::as_str), Some("web"));
        Ok((r.cert_pem, key))
    }
}

/// An agent RPC on `channel`: `Ok` when the call got past authentication
/// (the artifact does not exist, so `NotFound`).
async fn fetch(channel: Channel) -> Result<(), tonic::Status> {
    let digest = format!("sha256:{}", "0".repeat(64));
    match AgentServiceClient::new(channel)
        .fetch_artifact(pb::FetchArtifactRequest { digest, offset: 0 })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(s),
    }
}

async fn connect(channel: Channel, host: &str) -> Result<(), tonic::Status> {
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            host: host.to_string(),
            ..Default::default()
        })),
    };
    AgentServiceClient::new(channel)
        .connect(tokio_stream::iter(vec![hello]))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn a_client_without_certificate_reaches_only_join() {
    let c = Coordinator::start(true).await;

    let err = ControlServiceClient::new(c.anonymous())
        .list_hosts(pb::ListHostsRequest {})
        .await
        .expect_err("control API without a certificate");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("no client certificate"), "{err:?}");
    let err = ControlServiceClient::new(c.anonymous())
        .create_token(pb::CreateTokenRequest {
            ttl_ms: 600_000,
            ..Default::default()
        })
        .await
        .expect_err("minting tokens without a certificate");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = fetch(c.anonymous())
        .await
        .expect_err("fetch without a certificate");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = connect(c.anonymous(), "web-1")
        .await
        .expect_err("connect without a certificate");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // Join answers it: about the token, not about a certificate.
    let err = c
        .join("not-a-token", "web-9")
        .await
        .expect_err("unknown token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().starts_with("unknown token"), "{err:?}");

    let token = c.token("").await;
    assert!(token.len() >= 43, "{token}");
    let (cert, key) = c.join(&token, "web-9").await.expect("join");
    let id = Identity::from_pem(&cert).expect("identity");
    assert_eq!((id.role, id.name.as_str()), (Role::Agent, "web-9"));
    fetch(c.with_cert(&cert, &key))
        .await
        .expect("the joined certificate works");
    // An agent certificate still cannot call the control API.
    let err = ControlServiceClient::new(c.with_cert(&cert, &key))
        .list_hosts(pb::ListHostsRequest {})
        .await
        .expect_err("agent on the control API");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let err = c.join(&token, "web-10").await.expect_err("reused token");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().starts_with("token already used"), "{err:?}");

    // A bad CSR is refused without spending the token.
    let token = c.token("web-11").await;
    let err = JoinServiceClient::new(c.anonymous())
        .join(pb::JoinRequest {
            token: token.clone(),
            host: "web-11".into(),
            csr_pem: "garbage".into(),
        })
        .await
        .expect_err("bad csr");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .join(&token, "web-12")
        .await
        .expect_err("bound token, other host");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    c.join(&token, "web-11")
        .await
        .expect("token still good for its host");
}

#[tokio::test]
async fn a_removed_host_is_refused_on_every_agent_rpc_until_it_joins_again() {
    let c = Coordinator::start(true).await;
    let paths = pki::agent_paths(c.pki.path(), "web-1");
    let old = c.with_cert(&read(&paths.cert), &read(&paths.key));
    fetch(old.clone())
        .await
        .expect("web-1 admitted before removal");

    let r = c
        .operator()
        .remove_host(pb::RemoveHostRequest {
            host: "web-1".into(),
        })
        .await
        .expect("remove")
        .into_inner();
    assert!(!r.was_connected);

    for err in [
        fetch(old.clone()).await.expect_err("fetch after removal"),
        connect(old.clone(), "web-1")
            .await
            .expect_err("connect after removal"),
    ] {
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(
            err.message().starts_with("host web-1 was removed")
                && err.message().contains("join it again with a new token"),
            "{err:?}"
        );
    }

    let token = c.token("").await;
    let (cert, key) = c.join(&token, "web-1").await.expect("rejoin");
    fetch(c.with_cert(&cert, &key))
        .await
        .expect("the re-joined certificate is admitted");
    let err = fetch(old)
        .await
        .expect_err("the old certificate stays refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn without_ca_key_joining_is_off_and_says_how_to_turn_it_on() {
    let c = Coordinator::start(false).await;
    let err = c.join("whatever", "web-9").await.expect_err("joining off");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("ca_key"), "{err:?}");
    let err = c
        .operator()
        .create_token(pb::CreateTokenRequest {
            ttl_ms: 600_000,
            ..Default::default()
        })
        .await
        .expect_err("no tokens without a CA key");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("ca_key"), "{err:?}");
}
