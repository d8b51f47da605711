//! The `rollout` operator commands: they talk to the coordinator's
//! `ControlService` over mTLS with the operator certificate, and print tables
//! or JSON (`--output json`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollout_proto::pb;
use rollout_proto::pb::control_service_client::ControlServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub mod ping;
pub mod release;
pub mod tokens;

use crate::artifacts::sha256_file;
use crate::rollout::spec::load_spec;

/// A CLI failure, naming the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Cannot connect.
    #[error(
        "cannot reach the coordinator at {url}: {message}; is `rollout serve` running there? (set --coordinator)"
    )]
    Unreachable {
        /// URL.
        url: String,
        /// Transport message.
        message: String,
    },
    /// TLS rejected.
    #[error(
        "the coordinator at {url} rejected this client's certificate ({message}); use the operator certificate from the same `rollout certs init` as the coordinator (--certs DIR)"
    )]
    CertRejected {
        /// URL.
        url: String,
        /// Message.
        message: String,
    },
    /// The coordinator's certificate is not signed by the CA in `--certs`.
    #[error(
        "the coordinator at {url} presented a certificate this client does not trust ({message}); --certs DIR must hold ca.pem from the same `rollout certs init` as the coordinator's certificate"
    )]
    ServerCertUntrusted {
        /// URL.
        url: String,
        /// TLS message.
        message: String,
    },
    /// A plaintext client against a TLS coordinator.
    #[error(
        "the coordinator at {url} did not answer plaintext gRPC ({message}); it most likely serves mutual TLS: use an https:// URL with --certs DIR (--insecure-dev only works against a coordinator started with --insecure-dev)"
    )]
    PlaintextRefused {
        /// URL.
        url: String,
        /// Transport message.
        message: String,
    },
    /// The TLS connection was closed under the request.
    #[error(
        "the coordinator at {url} closed the connection ({message}); on a first request this means it refused this client's certificate: use the operator certificate from the same `rollout certs init` as the coordinator (--certs DIR); otherwise check that the coordinator is still running"
    )]
    ConnectionClosed {
        /// URL.
        url: String,
        /// Transport message.
        message: String,
    },
    /// Local files.
    #[error("read {path}: {error}")]
    Read {
        /// File.
        path: String,
        /// OS error (not a `source`: the message already shows it once).
        error: std::io::Error,
    },
    /// The coordinator refused the request.
    #[error("{0}")]
    Refused(String),
    /// Bad local input.
    #[error("{0}")]
    Invalid(String),
    /// Output failed.
    #[error("write output: {0}")]
    Output(#[from] std::io::Error),
}

/// How to reach the coordinator.
#[derive(Debug, Clone)]
pub struct Connection {
    /// `https://host:port` (or `http://` with `insecure_dev`).
    pub url: String,
    /// Directory holding `ca.pem`, `operator.pem`, `operator.key`.
    pub certs: Option<PathBuf>,
    /// Plaintext.
    pub insecure_dev: bool,
    /// How long a call may wait for the coordinator to start answering
    /// ([`ANSWER_TIMEOUT`] unless the operator says otherwise).
    pub answer_timeout: Duration,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Human tables.
    Table,
    /// JSON for scripts.
    Json,
}

/// The innermost message of a status raised by the transport (the connection
/// failed or closed) rather than by the coordinator's handlers.
fn transport_detail(s: &tonic::Status) -> Option<String> {
    let mut src = std::error::Error::source(s);
    let mut from_transport = false;
    let mut last = None;
    while let Some(e) = src {
        from_transport |= e.is::<tonic::transport::Error>();
        last = Some(e.to_string());
        src = e.source();
    }
    from_transport.then(|| last.unwrap_or_default())
}

fn classify(url: &str, plaintext: bool, s: &tonic::Status) -> CliError {
    let msg = s.message().to_string();
    let lower = format!("{msg} {:?}", s).to_lowercase();
    // No answer within ANSWER_TIMEOUT (the connection may have been closed
    // under a request that was then never failed).
    if lower.contains("timeout expired") || lower.contains("request timed out") {
        let message = "no answer within --answer-timeout".to_string();
        return if plaintext {
            CliError::PlaintextRefused {
                url: url.to_string(),
                message,
            }
        } else {
            CliError::Unreachable {
                url: url.to_string(),
                message,
            }
        };
    }
    if lower.contains("certificate")
        || lower.contains("unknownca")
        || lower.contains("tls")
        || lower.contains("handshake")
    {
        return CliError::CertRejected {
            url: url.to_string(),
            message: msg,
        };
    }
    if s.code() != tonic::Code::Unavailable
        && let Some(detail) = transport_detail(s)
    {
        let url = url.to_string();
        return if plaintext {
            CliError::PlaintextRefused {
                url,
                message: detail,
            }
        } else {
            CliError::ConnectionClosed {
                url,
                message: detail,
            }
        };
    }
    match s.code() {
        tonic::Code::Unavailable => CliError::Unreachable {
            url: url.to_string(),
            message: msg,
        },
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => CliError::CertRejected {
            url: url.to_string(),
            message: msg,
        },
        _ => CliError::Refused(msg),
    }
}

/// How long the CLI waits by default (`--answer-timeout`) for the
/// coordinator to start answering a request (a stream's first answer; an
/// upload, a ping and a fleet rollback are bounded by their size or timeout
/// instead): the CLI fails with a clear error rather than hang on a
/// coordinator that took the connection and never answers.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// An upload may take this long per MiB, over [`ANSWER_TIMEOUT`].
const UPLOAD_TIME_PER_MIB: Duration = Duration::from_secs(1);

/// A connected client.
#[derive(Debug)]
pub struct Client {
    /// Every call bounded by [`ANSWER_TIMEOUT`], from the moment it is made
    /// (also while it waits for a connection).
    inner: ControlServiceClient<tower::timeout::Timeout<Channel>>,
    /// For calls whose answer may take longer than [`ANSWER_TIMEOUT`] (an
    /// upload, a ping with a long `--timeout`, a fleet rollback): see
    /// [`Client::long`].
    long: Endpoint,
    answer_timeout: Duration,
    url: String,
    plaintext: bool,
}

impl Client {
    /// Connects (TLS unless `insecure_dev`).
    pub async fn connect(c: &Connection) -> Result<Client, CliError> {
        let unreachable = |message: String| CliError::Unreachable {
            url: c.url.clone(),
            message,
        };
        let mut ep = Endpoint::from_shared(c.url.clone())
            .map_err(|e| CliError::Invalid(format!("--coordinator {:?}: {e}", c.url)))?
            .connect_timeout(Duration::from_secs(5));
        if !c.insecure_dev {
            let dir = c.certs.clone().ok_or_else(|| {
                CliError::Invalid(
                    "no certificates: pass --certs DIR (from `rollout certs init`), or --insecure-dev for a throw-away local coordinator".into(),
                )
            })?;
            let read = |name: &str| {
                let p = dir.join(name);
                std::fs::read(&p).map_err(|e| {
                    CliError::Invalid(format!(
                        "cannot read {}: {e}; --certs DIR must hold ca.pem, operator.pem and operator.key from `rollout certs init`",
                        p.display()
                    ))
                })
            };
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read("ca.pem")?))
                .identity(Identity::from_pem(
                    read("operator.pem")?,
                    read("operator.key")?,
                ));
            ep = ep
                .tls_config(tls)
                .map_err(|e| CliError::Invalid(format!("TLS setup: {e}")))?;
        }
        let long = ep.clone();
        let ch = ep.connect().await.map_err(|e| {
            let detail = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string());
            if !c.insecure_dev && detail.to_lowercase().contains("certificate") {
                return CliError::ServerCertUntrusted {
                    url: c.url.clone(),
                    message: detail,
                };
            }
            unreachable(detail)
        })?;
        Ok(Client {
            inner: ControlServiceClient::new(tower::timeout::Timeout::new(ch, c.answer_timeout))
                .max_decoding_message_size(rollout_proto::MAX_MESSAGE_BYTES),
            long,
            answer_timeout: c.answer_timeout,
            url: c.url.clone(),
            plaintext: c.insecure_dev || c.url.starts_with("http://"),
        })
    }

    /// A client without [`ANSWER_TIMEOUT`], on a connection of its own, for
    /// a call whose answer may take longer; its caller bounds the call.
    pub async fn long(&self) -> Result<ControlServiceClient<Channel>, CliError> {
        let ch = self
            .long
            .connect()
            .await
            .map_err(|e| CliError::Unreachable {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        Ok(ControlServiceClient::new(ch)
            .max_decoding_message_size(rollout_proto::MAX_MESSAGE_BYTES))
    }

    /// The answer timeout of this client's calls.
    pub fn answer_timeout(&self) -> Duration {
        self.answer_timeout
    }

    /// `err` for a call that got no answer within `limit`.
    pub fn no_answer(&self, limit: Duration) -> CliError {
        let message = format!("no answer within {limit:?}");
        if self.plaintext {
            CliError::PlaintextRefused {
                url: self.url.clone(),
                message,
            }
        } else {
            CliError::Unreachable {
                url: self.url.clone(),
                message,
            }
        }
    }

    /// The raw gRPC client.
    pub fn raw(&mut self) -> &mut ControlServiceClient<tower::timeout::Timeout<Channel>> {
        &mut self.inner
    }

    fn err(&self, s: tonic::Status) -> CliError {
        classify(&self.url, self.plaintext, &s)
    }
}

fn ms_to_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn json_out(out: &mut dyn Write, v: &serde_json::Value) -> Result<(), CliError> {
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    )?;
    Ok(())
}

fn status_json(s: &pb::RolloutStatus) -> serde_json::Value {
    serde_json::json!({
        "id": s.id, "service": s.service, "release": s.release, "state": s.state,
        "current_batch": s.current_batch, "failures": s.failures, "failure_budget": s.failure_budget,
        "message": s.message, "created_at_ms": s.created_at_ms, "updated_at_ms": s.updated_at_ms,
        "finished": s.finished,
        "batches": s.batches.iter().map(|b| serde_json::json!({
            "index": b.index,
            "hosts": b.hosts.iter().map(|h| serde_json::json!({
                "host": h.host, "state": h.state, "failure": h.failure, "reason": h.reason,
                "previous_release": h.previous_release,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Prints one rollout as a table.
pub fn print_status(out: &mut dyn Write, s: &pb::RolloutStatus) -> Result<(), CliError> {
    writeln!(
        out,
        "rollout {}  {} {}  state {}  batch {}/{}  failures {}/{}",
        s.id,
        s.service,
        s.release,
        s.state,
        (s.current_batch as usize).min(s.batches.len()),
        s.batches.len(),
        s.failures,
        s.failure_budget
    )?;
    if !s.message.is_empty() {
        writeln!(out, "  {}", s.message)?;
    }
    for b in &s.batches {
        let hosts: Vec<String> = b
            .hosts
            .iter()
            .map(|h| {
                if h.failure.is_empty() {
                    format!("{}={}", h.host, h.state)
                } else {
                    format!("{}={}({})", h.host, h.state, h.failure)
                }
            })
            .collect();
        writeln!(out, "  batch {:>2}: {}", b.index, hosts.join("  "))?;
    }
    Ok(())
}

/// `rollout plan` / `rollout deploy`: checks the spec locally, uploads the
/// artifact (deploy only) and asks the coordinator.
pub async fn deploy(
    conn: &Connection,
    spec_path: &Path,
    dry_run: bool,
    wait: bool,
    output: Output,
    out: &mut dyn Write,
) -> Result<bool, CliError> {
    let spec = load_spec(spec_path).map_err(|e| CliError::Invalid(e.to_string()))?;
    let spec_toml = std::fs::read_to_string(spec_path).map_err(|error| CliError::Read {
        path: spec_path.display().to_string(),
        error,
    })?;
    let mut client = Client::connect(conn).await?;
    let (digest, size) = if dry_run {
        (String::new(), 0)
    } else {
        let path = &spec.artifact.path;
        let digest = sha256_file(path).map_err(|e| {
            CliError::Invalid(format!(
                "artifact {} cannot be read: {e}; check `artifact.path` in {} (a relative path is resolved against the spec file's directory)",
                path.display(),
                spec_path.display()
            ))
        })?;
        if let Some(d) = &spec.artifact.digest
            && d != &digest
        {
            return Err(CliError::Invalid(format!(
                "artifact digest mismatch: the spec says {d} but {} is {digest}; fix the spec's digest or rebuild the artifact",
                path.display()
            )));
        }
        let data = std::fs::read(path).map_err(|error| CliError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let size = data.len() as u64;
        let mut chunks: Vec<pb::UploadChunk> = data
            .chunks(rollout_proto::ARTIFACT_CHUNK_BYTES)
            .map(|c| pb::UploadChunk {
                digest: String::new(),
                data: c.to_vec(),
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(pb::UploadChunk::default());
        }
        chunks[0].digest = digest.clone();
        let limit = client.answer_timeout
            + UPLOAD_TIME_PER_MIB * (size >> 20).try_into().unwrap_or(u32::MAX);
        let upload = async {
            client
                .long()
                .await?
                .upload_artifact(tokio_stream::iter(chunks))
                .await
                .map_err(|s| client.err(s))
        };
        let r = tokio::time::timeout(limit, upload)
            .await
            .map_err(|_| client.no_answer(limit))??
            .into_inner();
        (r.digest, size)
    };
    let r = client
        .inner
        .deploy(pb::DeployRequest {
            spec_toml,
            artifact_digest: digest,
            artifact_size: size,
            dry_run,
        })
        .await
        .map_err(|s| client.err(s))?
        .into_inner();
    if dry_run {
        match output {
            Output::Json => json_out(
                out,
                &serde_json::json!({
                    "batches": r.batches.iter().map(|b| b.hosts.iter().map(|h| h.host.clone()).collect::<Vec<_>>()).collect::<Vec<_>>()
                }),
            )?,
            Output::Table => {
                for b in &r.batches {
                    let hosts: Vec<&str> = b.hosts.iter().map(|h| h.host.as_str()).collect();
                    writeln!(out, "batch {:>2}: {}", b.index, hosts.join(", "))?;
                }
            }
        }
        return Ok(true);
    }
    match output {
        Output::Json if !wait => json_out(out, &serde_json::json!({ "rollout_id": r.rollout_id }))?,
        _ => writeln!(out, "{}", r.rollout_id)?,
    }
    if wait {
        return watch_with(&mut client, &r.rollout_id, output, out).await;
    }
    Ok(true)
}

async fn watch_with(
    client: &mut Client,
    id: &str,
    output: Output,
    out: &mut dyn Write,
) -> Result<bool, CliError> {
    let mut stream = client
        .inner
        .watch_rollout(pb::RolloutRef { id: id.to_string() })
        .await
        .map_err(|s| client.err(s))?
        .into_inner();
    let mut last: Option<pb::RolloutStatus> = None;
    while let Some(s) = stream.message().await.map_err(|s| client.err(s))? {
        match output {
            Output::Json => writeln!(out, "{}", status_json(&s))?,
            Output::Table => {
                writeln!(out, "---")?;
                print_status(out, &s)?;
            }
        }
        out.flush()?;
        last = Some(s);
    }
    Ok(last.is_some_and(|s| s.state == "succeeded"))
}

/// `rollout watch ID`: live progress until the rollout ends; true on success.
pub async fn watch(
    conn: &Connection,
    id: &str,
    output: Output,
    out: &mut dyn Write,
) -> Result<bool, CliError> {
    let mut client = Client::connect(conn).await?;
    watch_with(&mut client, id, output, out).await
}

/// `rollout status [ID]`.
pub async fn status(
    conn: &Connection,
    id: Option<&str>,
    output: Output,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut client = Client::connect(conn).await?;
    let list = match id {
        Some(id) => vec![
            client
                .inner
                .get_rollout(pb::RolloutRef { id: id.to_string() })
                .await
                .map_err(|s| client.err(s))?
                .into_inner(),
        ],
        None => {
            client
                .inner
                .list_rollouts(pb::ListRolloutsRequest::default())
                .await
                .map_err(|s| client.err(s))?
                .into_inner()
                .rollouts
        }
    };
    match output {
        Output::Json => json_out(
            out,
            &serde_json::Value::Array(list.iter().map(status_json).collect()),
        )?,
        Output::Table => {
            if id.is_none() {
                writeln!(
                    out,
                    "{:<24} {:<14} {:<12} {:<16} {:>8} CREATED",
                    "ID", "SERVICE", "RELEASE", "STATE", "FAILED"
                )?;
                for s in &list {
                    writeln!(
                        out,
                        "{:<24} {:<14} {:<12} {:<16} {:>8} {}",
                        s.id,
                        s.service,
                        s.release,
                        s.state,
                        format!("{}/{}", s.failures, s.failure_budget),
                        ms_to_time(s.created_at_ms)
                    )?;
                }
            } else {
                for s in &list {
                    print_status(out, s)?;
                }
            }
        }
    }
    Ok(())
}

/// Which operator action.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// Pause between batches.
    Pause,
    /// Resume.
    Resume,
    /// Continue after a canary stage.
    Promote,
    /// Stop and roll back.
    Abort,
}

/// `rollout pause|resume|promote|abort ID`.
pub async fn act(
    conn: &Connection,
    action: Action,
    id: &str,
    output: Output,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut client = Client::connect(conn).await?;
    let r = pb::RolloutRef { id: id.to_string() };
    let s = match action {
        Action::Pause => client.inner.pause(r).await,
        Action::Resume => client.inner.resume(r).await,
        Action::Promote => client.inner.promote(r).await,
        Action::Abort => client.inner.abort(r).await,
    }
    .map_err(|s| client.err(s))?
    .into_inner();
    match output {
        Output::Json => json_out(out, &status_json(&s)),
        Output::Table => print_status(out, &s),
    }
}

/// `rollout rollback <service> [--to]`.
pub async fn rollback(
    conn: &Connection,
    service: &str,
    to: Option<&str>,
    output: Output,
    out: &mut dyn Write,
) -> Result<bool, CliError> {
    let client = Client::connect(conn).await?;
    // Answered once every host has answered its rollback: not bounded by
    // ANSWER_TIMEOUT.
    let r = client
        .long()
        .await?
        .rollback_service(pb::RollbackServiceRequest {
            service: service.to_string(),
            to_release: to.unwrap_or_default().to_string(),
        })
        .await
        .map_err(|s| client.err(s))?
        .into_inner();
    match output {
        Output::Json => json_out(
            out,
            &serde_json::Value::Array(
                r.hosts
                    .iter()
                    .map(|h| serde_json::json!({"host": h.host, "state": h.state, "reason": h.reason}))
                    .collect(),
            ),
        )?,
        Output::Table => {
            for h in &r.hosts {
                writeln!(out, "{:<20} {:<12} {}", h.host, h.state, h.reason)?;
            }
        }
    }
    Ok(r.hosts.iter().all(|h| h.state == "rolled_back"))
}

fn phase_name(p: i32) -> &'static str {
    match pb::Phase::try_from(p).unwrap_or(pb::Phase::Unspecified) {
        pb::Phase::Idle => "idle",
        pb::Phase::Activating => "activating",
        pb::Phase::Verifying => "verifying",
        pb::Phase::Probation => "probation",
        pb::Phase::RollingBack => "rolling_back",
        pb::Phase::Degraded => "degraded",
        pb::Phase::Unspecified => "-",
    }
}

fn health_name(h: i32) -> &'static str {
    match pb::Health::try_from(h).unwrap_or(pb::Health::Unknown) {
        pb::Health::Healthy => "healthy",
        pb::Health::Unhealthy => "unhealthy",
        pb::Health::Unknown => "unknown",
    }
}

/// `rollout hosts`.
pub async fn hosts(conn: &Connection, output: Output, out: &mut dyn Write) -> Result<(), CliError> {
    let mut client = Client::connect(conn).await?;
    hosts_with(&mut client, output, out).await
}

/// `rollout top`: the hosts table refreshed in place every `interval`, until
/// `iterations` refreshes (0 = until interrupted).
pub async fn top(
    conn: &Connection,
    interval: Duration,
    iterations: u64,
    output: Output,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut client = Client::connect(conn).await?;
    let mut n = 0u64;
    loop {
        if output == Output::Table {
            // Home the cursor and clear the screen: refresh in place.
            write!(out, "\x1b[H\x1b[2J")?;
            writeln!(
                out,
                "rollout top — {}  (every {})",
                client.url,
                humantime::format_duration(interval)
            )?;
        }
        hosts_with(&mut client, output, out).await?;
        out.flush()?;
        n += 1;
        if iterations != 0 && n >= iterations {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

async fn hosts_with(
    client: &mut Client,
    output: Output,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let r = client
        .inner
        .list_hosts(pb::ListHostsRequest {})
        .await
        .map_err(|s| client.err(s))?
        .into_inner();
    match output {
        Output::Json => json_out(
            out,
            &serde_json::Value::Array(
                r.hosts
                    .iter()
                    .map(|h| {
                        let rep = h.report.clone().unwrap_or_default();
                        serde_json::json!({
                            "host": h.host, "labels": h.labels, "connected": h.connected,
                            "last_seen_ms": h.last_seen_ms, "address": h.address,
                            "cpu_percent": rep.cpu_percent, "mem_used_bytes": rep.mem_used_bytes,
                            "mem_total_bytes": rep.mem_total_bytes,
                            "services": rep.services.iter().map(|s| serde_json::json!({
                                "service": s.service, "release": s.current_release,
                                "last_known_good": s.last_known_good, "phase": phase_name(s.phase),
                                "health": health_name(s.health), "rss_bytes": s.rss_bytes, "cpu_percent": s.cpu_percent,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect(),
            ),
        )?,
        Output::Table => {
            writeln!(out, "{:<16} {:<20} {:<10} {:<24} {:<12} {:<10} {:>6} {:>10}", "HOST", "LABELS", "CONNECTED", "SERVICE=RELEASE", "PHASE", "HEALTH", "CPU%", "MEM-MiB")?;
            for h in &r.hosts {
                let rep = h.report.clone().unwrap_or_default();
                let mut labels: Vec<String> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                let first = rep.services.first();
                writeln!(
                    out,
                    "{:<16} {:<20} {:<10} {:<24} {:<12} {:<10} {:>6.1} {:>10}",
                    h.host,
                    labels.join(","),
                    if h.connected { "yes" } else { "no" },
                    first.map(|s| format!("{}={}", s.service, s.current_release)).unwrap_or_else(|| "-".into()),
                    first.map(|s| phase_name(s.phase)).unwrap_or("-"),
                    first.map(|s| health_name(s.health)).unwrap_or("-"),
                    rep.cpu_percent,
                    rep.mem_used_bytes >> 20
                )?;
                for s in rep.services.iter().skip(1) {
                    writeln!(out, "{:<16} {:<20} {:<10} {:<24} {:<12} {:<10}", "", "", "", format!("{}={}", s.service, s.current_release), phase_name(s.phase), health_name(s.health))?;
                }
            }
        }
    }
    Ok(())
}

/// `rollout history <service>`.
pub async fn history(
    conn: &Connection,
    service: &str,
    output: Output,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut client = Client::connect(conn).await?;
    let r = client
        .inner
        .history(pb::HistoryRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| client.err(s))?
        .into_inner();
    match output {
        Output::Json => json_out(
            out,
            &serde_json::json!({
                "rollouts": r.rollouts.iter().map(status_json).collect::<Vec<_>>(),
                "hosts": r.hosts.iter().map(|h| serde_json::json!({
                    "host": h.host,
                    "entries": h.entries.iter().map(|e| serde_json::json!({
                        "release": e.release, "event": e.event, "reason": e.reason, "at_ms": e.at_ms, "cause": e.cause,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        )?,
        Output::Table => {
            writeln!(out, "rollouts of {service}:")?;
            for s in &r.rollouts {
                writeln!(
                    out,
                    "  {} {:<12} {:<14} {}",
                    ms_to_time(s.created_at_ms),
                    s.release,
                    s.state,
                    s.id
                )?;
            }
            for h in &r.hosts {
                writeln!(out, "{}:", h.host)?;
                for e in &h.entries {
                    writeln!(
                        out,
                        "  {} {:<12} {:<14} {:<20} {}",
                        ms_to_time(e.at_ms),
                        e.release,
                        e.event,
                        e.cause,
                        e.reason
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// `rollout events ID`.
pub async fn events(
    conn: &Connection,
    id: &str,
    output: Output,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut client = Client::connect(conn).await?;
    let r = client
        .inner
        .events(pb::RolloutRef { id: id.to_string() })
        .await
        .map_err(|s| client.err(s))?
        .into_inner();
    match output {
        Output::Json => json_out(
            out,
            &serde_json::Value::Array(
                r.events
                    .iter()
                    .map(|e| serde_json::json!({"seq": e.seq, "at_ms": e.at_ms, "host": e.host, "kind": e.kind, "message": e.message}))
                    .collect(),
            ),
        )?,
        Output::Table => {
            for e in &r.events {
                writeln!(out, "{} {:<14} {:<16} {}", ms_to_time(e.at_ms), e.kind, if e.host.is_empty() { "-" } else { &e.host }, e.message)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "coordinator" that takes connections and never answers (nor
    /// closes them) until the test ends.
    async fn silent() -> (String, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        (url, task)
    }

    #[tokio::test]
    async fn a_coordinator_that_never_answers_fails_the_call_with_the_cause() {
        let (url, task) = silent().await;
        let conn = Connection {
            url: url.clone(),
            certs: None,
            insecure_dev: true,
            answer_timeout: Duration::from_millis(300),
        };
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        let err = hosts(&conn, Output::Table, &mut out)
            .await
            .expect_err("no answer");
        let text = err.to_string();
        assert!(text.contains("no answer"), "{text}");
        assert!(text.contains("https://"), "{text}");
        // Bounded by the answer timeout, not by the test's.
        assert!(started.elapsed() < Duration::from_secs(20));
        let err = crate::cli::ping::ping(
            &conn,
            &[],
            Duration::from_millis(200),
            Output::Table,
            &mut out,
        )
        .await
        .expect_err("no answer");
        assert!(err.to_string().contains("no answer within"), "{err}");
        task.abort();
    }
}
