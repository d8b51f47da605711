//! `rollout-agent`: the host daemon (`run`), joining the fleet (`join`), and
//! the local admin commands (`status`, `releases`, `rollback`) that talk to it
//! over its Unix socket.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rollout_agent::admin;
use rollout_agent::config::{
    ADMIN_SOCKET_NAME, AgentConfig, DEFAULT_DATA_DIR, LogFilter, LogFormat,
};
use rollout_proto::pb;
use tokio_util::sync::CancellationToken;

/// jemalloc, with the options of `.cargo/config.toml` built in.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The rollout host agent.
#[derive(Debug, Parser)]
#[command(name = "rollout-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
struct SocketArgs {
    /// Admin socket of the running agent.
    #[arg(long, conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// Read the admin socket path from this agent config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent daemon.
    Run {
        /// Agent config file (TOML).
        #[arg(long, default_value = "/etc/rollout/agent.toml")]
        config: PathBuf,
        /// Log format (overrides the config's [log] format).
        #[arg(long, value_parser = ["human", "json"])]
        log_format: Option<String>,
    },
    /// Join the fleet with a token from `rollout token create`: generates this
    /// host's key (it never leaves the host), has the coordinator sign it, and
    /// writes agent.pem, agent.key (0600) and ca.pem into --dir.
    Join {
        /// Coordinator URL, e.g. https://coordinator.internal:7443.
        #[arg(long)]
        coordinator: String,
        /// The single-use token.
        #[arg(
            long,
            env = "ROLLOUT_JOIN_TOKEN",
            hide_env_values = true,
            allow_hyphen_values = true
        )]
        token: String,
        /// The fleet's CA certificate (ca.pem from `rollout certs init`); the
        /// coordinator is verified against it.
        #[arg(long)]
        ca: PathBuf,
        /// Host name to join as (default: this machine's host name).
        #[arg(long)]
        host: Option<String>,
        /// Where to write agent.pem, agent.key and ca.pem.
        #[arg(long, default_value = "/etc/rollout")]
        dir: PathBuf,
        /// Agent config to write if it does not exist (else the lines to add are printed).
        #[arg(long)]
        config: Option<PathBuf>,
        /// data_dir for a written config (default: the agent's default).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Show every service on this host: release, phase, health, CPU, memory.
    Status {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// List the staged releases and the history of a service.
    Releases {
        /// Service name.
        service: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Roll a service back on this host, with or without a coordinator.
    Rollback {
        /// Service name.
        service: String,
        /// Release to return to (default: last known good, else previous).
        #[arg(long)]
        to: Option<String>,
        /// Why, recorded in the history.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Print a shell completion script, e.g. `rollout-agent completions bash`.
    Completions {
        /// Shell to complete for.
        #[arg(value_enum)]
        shell: rollout_cli_docs::Shell,
    },
    /// Write the man pages (rollout-agent.1 and one per subcommand) into a directory.
    Man {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

fn socket_path(args: &SocketArgs) -> Result<PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    if let Some(c) = &args.config {
        return Ok(AgentConfig::load(c, &host_name())?.admin_socket);
    }
    Ok(Path::new(DEFAULT_DATA_DIR).join(ADMIN_SOCKET_NAME))
}

fn init_logging(format: LogFormat, level: &LogFilter) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = level.targets();
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => tracing_subscriber::registry().with(fmt).with(filter).init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(fmt.json())
            .with(filter)
            .init(),
    }
}

fn ms_to_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
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

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn service_json(s: &pb::ServiceReport) -> serde_json::Value {
    serde_json::json!({
        "service": s.service,
        "current": s.current_release,
        "previous": s.previous_release,
        "last_known_good": s.last_known_good,
        "phase": phase_name(s.phase),
        "step": s.step,
        "health": health_name(s.health),
        "rss_bytes": s.rss_bytes,
        "cpu_percent": s.cpu_percent,
    })
}

fn history_json(h: &pb::HistoryEntry) -> serde_json::Value {
    serde_json::json!({
        "seq": h.seq, "release": h.release, "event": h.event,
        "reason": h.reason, "at_ms": h.at_ms, "cause": h.cause,
    })
}

async fn admin_client(
    args: &SocketArgs,
) -> Result<pb::agent_admin_client::AgentAdminClient<tonic::transport::Channel>> {
    let path = socket_path(args)?;
    Ok(admin::connect(&path).await?)
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

async fn run_cli(cmd: Cmd) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        Cmd::Completions { shell } => {
            let command = <Cli as clap::CommandFactory>::command();
            rollout_cli_docs::write_completions(shell, command, &mut out)?;
        }
        Cmd::Man { out: dir } => {
            let command = <Cli as clap::CommandFactory>::command();
            let pages = rollout_cli_docs::write_man_pages(command, &dir)
                .with_context(|| format!("write man pages to {}", dir.display()))?;
            writeln!(out, "wrote {} man pages to {}", pages.len(), dir.display())?;
        }
        Cmd::Run { config, log_format } => {
            let mut cfg = AgentConfig::load(&config, &host_name())?;
            if let Some(f) = log_format {
                cfg.log_format = if f == "json" {
                    LogFormat::Json
                } else {
                    LogFormat::Human
                };
            }
            init_logging(cfg.log_format, &cfg.log_level);
            let _ = rustls::crypto::ring::default_provider().install_default();
            let cancel = CancellationToken::new();
            let c = cancel.clone();
            tokio::spawn(async move {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(t) => t,
                        Err(_) => return,
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                c.cancel();
            });
            rollout_agent::agent::run(cfg, cancel).await?;
        }
        Cmd::Join {
            coordinator,
            token,
            ca,
            host,
            dir,
            config,
            data_dir,
        } => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let opts = rollout_agent::join::JoinOptions {
                coordinator,
                token,
                ca,
                host: host.unwrap_or_else(host_name),
                dir,
                config,
                data_dir,
            };
            let joined = rollout_agent::join::join(&opts).await?;
            print_joined(&mut out, &joined)?;
        }
        Cmd::Status { socket } => {
            let mut client = admin_client(&socket).await?;
            let st = client
                .status(pb::StatusRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let report = st.report.unwrap_or_default();
            match socket.output {
                Output::Json => {
                    let v = serde_json::json!({
                        "host": st.host,
                        "coordinator_connected": st.coordinator_connected,
                        "cpu_percent": report.cpu_percent,
                        "mem_used_bytes": report.mem_used_bytes,
                        "mem_total_bytes": report.mem_total_bytes,
                        "disk_free_bytes": report.disk_free_bytes,
                        "services": report.services.iter().map(service_json).collect::<Vec<_>>(),
                    });
                    writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
                }
                Output::Table => {
                    writeln!(
                        out,
                        "host {}  coordinator {}  cpu {:.1}%  mem {}/{} MiB",
                        st.host,
                        if st.coordinator_connected {
                            "connected"
                        } else {
                            "disconnected"
                        },
                        report.cpu_percent,
                        report.mem_used_bytes >> 20,
                        report.mem_total_bytes >> 20
                    )?;
                    writeln!(
                        out,
                        "{:<20} {:<16} {:<16} {:<24} {:<10} {:>7} {:>9}",
                        "SERVICE", "CURRENT", "LAST-GOOD", "PHASE", "HEALTH", "CPU%", "RSS-MiB"
                    )?;
                    for s in &report.services {
                        writeln!(
                            out,
                            "{:<20} {:<16} {:<16} {:<24} {:<10} {:>7.1} {:>9.1}",
                            s.service,
                            or_dash(&s.current_release),
                            or_dash(&s.last_known_good),
                            s.step,
                            health_name(s.health),
                            s.cpu_percent,
                            s.rss_bytes as f64 / 1048576.0
                        )?;
                    }
                }
            }
        }
        Cmd::Releases { service, socket } => {
            let mut client = admin_client(&socket).await?;
            let r = client
                .releases(pb::ReleasesRequest { service })
                .await
                .map_err(status_err)?
                .into_inner();
            match socket.output {
                Output::Json => {
                    let v = serde_json::json!({
                        "releases": r.releases.iter().map(|x| serde_json::json!({
                            "release": x.release, "digest": x.digest, "staged_at_ms": x.staged_at_ms,
                            "current": x.current, "previous": x.previous, "last_known_good": x.last_known_good,
                        })).collect::<Vec<_>>(),
                        "history": r.history.iter().map(history_json).collect::<Vec<_>>(),
                    });
                    writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
                }
                Output::Table => {
                    writeln!(
                        out,
                        "{:<20} {:<22} {:<20} DIGEST",
                        "RELEASE", "STAGED", "ROLE"
                    )?;
                    for x in &r.releases {
                        let mut roles = Vec::new();
                        if x.current {
                            roles.push("current");
                        }
                        if x.last_known_good {
                            roles.push("last-good");
                        }
                        if x.previous {
                            roles.push("previous");
                        }
                        writeln!(
                            out,
                            "{:<20} {:<22} {:<20} {}",
                            x.release,
                            ms_to_time(x.staged_at_ms),
                            or_dash(&roles.join(",")),
                            x.digest
                        )?;
                    }
                    writeln!(out)?;
                    writeln!(
                        out,
                        "{:<22} {:<16} {:<16} {:<12} REASON",
                        "WHEN", "RELEASE", "EVENT", "CAUSE"
                    )?;
                    for h in &r.history {
                        writeln!(
                            out,
                            "{:<22} {:<16} {:<16} {:<12} {}",
                            ms_to_time(h.at_ms),
                            h.release,
                            h.event,
                            h.cause,
                            h.reason
                        )?;
                    }
                }
            }
        }
        Cmd::Rollback {
            service,
            to,
            reason,
            socket,
        } => {
            let mut client = admin_client(&socket).await?;
            let r = client
                .rollback(pb::AdminRollbackRequest {
                    service: service.clone(),
                    to_release: to.unwrap_or_default(),
                    reason,
                })
                .await
                .map_err(status_err)
                .with_context(|| format!("roll back {service}"))?
                .into_inner();
            let s = r.service.unwrap_or_default();
            match socket.output {
                Output::Json => {
                    writeln!(out, "{}", serde_json::to_string_pretty(&service_json(&s))?)?
                }
                Output::Table => writeln!(
                    out,
                    "{}: rolled back to {} ({}, {})",
                    s.service,
                    or_dash(&s.current_release),
                    s.step,
                    health_name(s.health)
                )?,
            }
        }
    }
    Ok(())
}

fn print_joined(out: &mut dyn std::io::Write, j: &rollout_agent::join::Joined) -> Result<()> {
    use rollout_agent::join::ConfigOutcome;
    writeln!(out, "joined the fleet as {}", j.host)?;
    writeln!(
        out,
        "wrote {} (mode 0600; generated here, never sent), {} and {}",
        j.key.display(),
        j.cert.display(),
        j.ca.display()
    )?;
    match &j.config {
        ConfigOutcome::Written(p) => writeln!(
            out,
            "wrote {0}; start the agent with: rollout-agent run --config {0}",
            p.display()
        )?,
        ConfigOutcome::Exists(p, text) => writeln!(
            out,
            "{} exists and was left as is; set these keys in it (the [coordinator] section, host and labels):\n\n{text}",
            p.display()
        )?,
        ConfigOutcome::NotAsked(text) => {
            writeln!(out, "agent config lines for this host:\n\n{text}")?
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One thread runs every task: the agent mostly waits, and its blocking
    // file work goes to the blocking pool. Worker threads would each cost a
    // stack and a malloc arena, and tasks moving between them spread their
    // allocations over the arenas: the agent's RSS kept growing over
    // deploy+rollback cycles with two workers, and levels off with one.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rollout-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_cli(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rollout-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
