//! `rollout-agent join`: admits this host into the fleet with a single-use
//! token from `rollout token create`.
//!
//! The agent's key pair is generated here, on the host, and never leaves it:
//! only a certificate signing request travels to the coordinator's
//! `JoinService.Join`, over TLS that verifies the coordinator against the
//! given CA and presents no client certificate (the host has none yet). The
//! coordinator answers with the certificate (role agent, CN = host), the CA,
//! and the token's labels. Then `agent.key` (mode 0600), `agent.pem` and
//! `ca.pem` are written into the directory, each by rename, and — when asked
//! and no config exists yet — an agent config pointing at them, with the
//! token's labels under `[labels]` (an existing config is left alone: the
//! lines to add are returned instead).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollout_proto::pb;
use rollout_proto::pb::join_service_client::JoinServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// File name of the agent certificate in the join directory.
pub const CERT_FILE: &str = "agent.pem";
/// File name of the agent key in the join directory (mode 0600).
pub const KEY_FILE: &str = "agent.key";
/// File name of the CA certificate in the join directory.
pub const CA_FILE: &str = "ca.pem";

/// How long the join may take, connection included.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What `rollout-agent join` was asked to do.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// `https://host:port` of the coordinator.
    pub coordinator: String,
    /// The token from `rollout token create`.
    pub token: String,
    /// The CA certificate that signed the coordinator's certificate.
    pub ca: PathBuf,
    /// The name to join as (the certificate's CN, the agent's `host`).
    pub host: String,
    /// Where `agent.pem`, `agent.key` and `ca.pem` go.
    pub dir: PathBuf,
    /// An agent config to write (when it does not exist yet).
    pub config: Option<PathBuf>,
    /// `data_dir` for a written config (default: the agent's default).
    pub data_dir: Option<PathBuf>,
}

/// Why a join failed; each names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// A local file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Key or CSR generation failed.
    #[error("generate the agent key and certificate request: {0}")]
    Key(#[from] rcgen::Error),
    /// Nothing answered.
    #[error(
        "cannot reach the coordinator at {url}: {message}; check --coordinator and that `rollout serve` runs there"
    )]
    Unreachable {
        /// The URL.
        url: String,
        /// Transport message.
        message: String,
    },
    /// The coordinator's certificate does not chain to `--ca`.
    #[error(
        "the coordinator at {url} presented a certificate not signed by {ca} ({message}); --ca must be the ca.pem of the coordinator's `rollout certs init`"
    )]
    Untrusted {
        /// The URL.
        url: String,
        /// The CA file.
        ca: PathBuf,
        /// TLS message.
        message: String,
    },
    /// The token was refused (unknown, expired, used, other host).
    #[error("the coordinator refused the join: {0}")]
    TokenRefused(String),
    /// The coordinator cannot sign (no `[tls] ca_key`).
    #[error("the coordinator cannot admit hosts: {0}")]
    JoiningOff(String),
    /// Any other refusal.
    #[error("join failed: {0}")]
    Failed(String),
}

/// What a successful join wrote.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The host name the certificate is for.
    pub host: String,
    /// The agent certificate.
    pub cert: PathBuf,
    /// The agent key (mode 0600).
    pub key: PathBuf,
    /// The CA certificate.
    pub ca: PathBuf,
    /// The token's labels.
    pub labels: BTreeMap<String, String>,
    /// What happened to `--config`.
    pub config: ConfigOutcome,
}

/// What happened to the agent config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOutcome {
    /// No `--config` given; the config lines to use.
    NotAsked(String),
    /// Written to this path.
    Written(PathBuf),
    /// It existed and was left alone; the lines to add.
    Exists(PathBuf, String),
}

/// A fresh ECDSA P-256 key and a PEM CSR for `host`; returns
/// `(csr_pem, key_pem)`. The coordinator ignores the CSR's subject and sets
/// the name itself; the CN only helps a human reading the CSR.
pub fn generate_csr(host: &str) -> Result<(String, String), JoinError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, host);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The agent config for a joined host: `host`, optional `data_dir`,
/// `[labels]` and the `[coordinator]` section pointing at the joined files.
pub fn config_text(
    host: &str,
    url: &str,
    files: (&Path, &Path, &Path),
    labels: &BTreeMap<String, String>,
    data_dir: Option<&Path>,
) -> String {
    let (ca, cert, key) = files;
    let path = |p: &Path| toml_str(&p.display().to_string());
    let mut c = format!("host = {}\n", toml_str(host));
    if let Some(d) = data_dir {
        c.push_str(&format!("data_dir = {}\n", path(d)));
    }
    if !labels.is_empty() {
        c.push_str("\n[labels]\n");
        for (k, v) in labels {
            c.push_str(&format!("{} = {}\n", toml_str(k), toml_str(v)));
        }
    }
    c.push_str(&format!(
        "\n[coordinator]\nurl = {}\nca = {}\ncert = {}\nkey = {}\n",
        toml_str(url),
        path(ca),
        path(cert),
        path(key)
    ));
    c
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JoinError + 'a {
    move |source| JoinError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `path` through a temporary file in the same
/// directory renamed over it, with `mode` from the file's creation on.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), JoinError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(&tmp).map_err(io("cannot create", &tmp))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(io("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("cannot rename into", path))
}

/// An error and its sources, each said once (transport errors repeat their
/// source in their own message).
fn source_chain(e: &dyn std::error::Error) -> String {
    with_sources(e.to_string(), e.source())
}

fn with_sources(mut out: String, mut src: Option<&dyn std::error::Error>) -> String {
    while let Some(s) = src {
        let part = s.to_string();
        if !out.contains(&part) {
            out.push_str(": ");
            out.push_str(&part);
        }
        src = s.source();
    }
    out
}

fn looks_like_tls(message: &str) -> bool {
    let m = message.to_lowercase();
    m.contains("certificate") || m.contains("unknownissuer") || m.contains("invalid peer")
}

/// Joins the fleet: key and CSR here, `Join` at the coordinator, files
/// written. Nothing is written unless the coordinator signed.
pub async fn join(opts: &JoinOptions) -> Result<Joined, JoinError> {
    crate::release::validate_name("--host", &opts.host)
        .map_err(|e| JoinError::Invalid(format!("--host: {}", e.reason)))?;
    if !opts.coordinator.starts_with("https://") {
        return Err(JoinError::Invalid(format!(
            "--coordinator {:?} must start with https:// (joining needs TLS; the CA in --ca checks the coordinator)",
            opts.coordinator
        )));
    }
    let token = opts.token.trim();
    if token.is_empty() {
        return Err(JoinError::Invalid(
            "--token is empty; pass the token printed by `rollout token create`".into(),
        ));
    }
    if let Some(d) = &opts.data_dir
        && !d.is_absolute()
    {
        return Err(JoinError::Invalid(format!(
            "--data-dir {} must be an absolute path",
            d.display()
        )));
    }
    let ca_pem = std::fs::read(&opts.ca).map_err(|source| JoinError::Io {
        action: "cannot read the CA certificate (--ca)",
        path: opts.ca.clone(),
        source,
    })?;
    let dir = std::path::absolute(&opts.dir).map_err(io("cannot resolve", &opts.dir))?;

    let (csr_pem, key_pem) = generate_csr(&opts.host)?;

    let unreachable = |message: String| JoinError::Unreachable {
        url: opts.coordinator.clone(),
        message,
    };
    let untrusted = |message: String| JoinError::Untrusted {
        url: opts.coordinator.clone(),
        ca: opts.ca.clone(),
        message,
    };
    let ep = Endpoint::from_shared(opts.coordinator.clone())
        .map_err(|e| JoinError::Invalid(format!("--coordinator {:?}: {e}", opts.coordinator)))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(JOIN_TIMEOUT)
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)))
        .map_err(|e| {
            JoinError::Invalid(format!("TLS setup with --ca {}: {e}", opts.ca.display()))
        })?;
    let channel = ep.connect().await.map_err(|e| {
        let message = source_chain(&e);
        if looks_like_tls(&message) {
            untrusted(message)
        } else {
            unreachable(message)
        }
    })?;
    let mut client =
        JoinServiceClient::new(channel).max_decoding_message_size(rollout_proto::MAX_MESSAGE_BYTES);
    let response = client
        .join(pb::JoinRequest {
            token: token.to_string(),
            host: opts.host.clone(),
            csr_pem,
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                JoinError::TokenRefused(s.message().to_string())
            }
            tonic::Code::FailedPrecondition => JoinError::JoiningOff(s.message().to_string()),
            tonic::Code::Unavailable | tonic::Code::Unknown => {
                let message = with_sources(s.message().to_string(), std::error::Error::source(&s));
                if looks_like_tls(&message) {
                    untrusted(message)
                } else {
                    unreachable(message)
                }
            }
            tonic::Code::Unimplemented => JoinError::Failed(format!(
                "the coordinator at {} does not offer joining (an older version?): {}",
                opts.coordinator,
                s.message()
            )),
            _ => JoinError::Failed(s.message().to_string()),
        })?
        .into_inner();
    if response.cert_pem.is_empty() || response.host != opts.host {
        return Err(JoinError::Failed(format!(
            "the coordinator answered with a certificate for {:?}, not {:?}",
            response.host, opts.host
        )));
    }

    if !dir.is_dir() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        b.create(&dir)
            .map_err(io("cannot create directory", &dir))?;
    }
    let joined_ca = if response.ca_pem.is_empty() {
        ca_pem
    } else {
        response.ca_pem.into_bytes()
    };
    let (cert, key, ca) = (dir.join(CERT_FILE), dir.join(KEY_FILE), dir.join(CA_FILE));
    write_atomic(&ca, &joined_ca, 0o644)?;
    write_atomic(&key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&cert, response.cert_pem.as_bytes(), 0o644)?;

    let labels: BTreeMap<String, String> = response.labels.into_iter().collect();
    let text = config_text(
        &opts.host,
        &opts.coordinator,
        (&ca, &cert, &key),
        &labels,
        opts.data_dir.as_deref(),
    );
    let config = match &opts.config {
        None => ConfigOutcome::NotAsked(text),
        Some(p) if p.exists() => ConfigOutcome::Exists(p.clone(), text),
        Some(p) => {
            // A config the agent would refuse is a bug here, not the user's.
            crate::config::AgentConfig::parse(&text, p, &opts.host)
                .map_err(|e| JoinError::Failed(format!("the generated config is invalid: {e}")))?;
            let body = format!(
                "# Written by `rollout-agent join` for host {}.\n{text}",
                opts.host
            );
            if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io("cannot create directory", parent))?;
            }
            write_atomic(p, body.as_bytes(), 0o600)?;
            ConfigOutcome::Written(p.clone())
        }
    };
    Ok(Joined {
        host: opts.host.clone(),
        cert,
        key,
        ca,
        labels,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_csr_is_a_pem_request_and_the_key_stays_here() {
        let (csr, key) = generate_csr("web-1").expect("csr");
        assert!(
            csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{csr}"
        );
        assert!(key.contains("PRIVATE KEY"));
        assert!(!csr.contains("PRIVATE KEY"));
        // Parses and its signature verifies (proof of possession).
        rcgen::CertificateSigningRequestParams::from_pem(&csr).expect("parses");
    }

    #[test]
    fn join_config_text_is_a_valid_agent_config_with_the_labels() {
        let labels = BTreeMap::from([
            ("role".to_string(), "web".to_string()),
            ("zone name".to_string(), "a\"b".to_string()),
        ]);
        let text = config_text(
            "web-1",
            "https://coord:7443",
            (
                Path::new("/etc/rollout/ca.pem"),
                Path::new("/etc/rollout/agent.pem"),
                Path::new("/etc/rollout/agent.key"),
            ),
            &labels,
            Some(Path::new("/srv/rollout")),
        );
        let c = crate::config::AgentConfig::parse(&text, Path::new("agent.toml"), "other")
            .expect("parses");
        assert_eq!(c.host, "web-1");
        assert_eq!(c.labels, labels);
        assert_eq!(c.data_dir, PathBuf::from("/srv/rollout"));
        let coord = c.coordinator.expect("coordinator");
        assert_eq!(coord.url, "https://coord:7443");
        let tls = coord.tls.expect("tls");
        assert_eq!(tls.key, PathBuf::from("/etc/rollout/agent.key"));
    }

    #[test]
    fn join_atomic_write_sets_the_mode_from_the_start() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("agent.key");
        std::fs::write(&p, "old").expect("old");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_atomic(&p, b"new", 0o600).expect("write");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "new");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp.path().join(".agent.key.tmp").exists());
    }

    #[tokio::test]
    async fn join_refuses_bad_arguments_before_any_network() {
        let opts = JoinOptions {
            coordinator: "https://127.0.0.1:1".into(),
            token: "t".into(),
            ca: PathBuf::from("/nonexistent/ca.pem"),
            host: "web-1".into(),
            dir: PathBuf::from("/nonexistent/dir"),
            config: None,
            data_dir: None,
        };
        let e = join(&JoinOptions {
            host: "../x".into(),
            ..opts.clone()
        })
        .await
        .expect_err("bad host");
        assert!(e.to_string().contains("--host"), "{e}");
        let e = join(&JoinOptions {
            coordinator: "http://c:1".into(),
            ..opts.clone()
        })
        .await
        .expect_err("plaintext");
        assert!(e.to_string().contains("https://"), "{e}");
        let e = join(&JoinOptions {
            token: " ".into(),
            ..opts.clone()
        })
        .await
        .expect_err("empty token");
        assert!(e.to_string().contains("rollout token create"), "{e}");
        let e = join(&opts).await.expect_err("missing ca");
        assert!(e.to_string().contains("--ca"), "{e}");
        assert!(!Path::new("/nonexistent/dir").exists());
    }
}
