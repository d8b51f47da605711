//! `rollout`: the operator CLI and the coordinator daemon (`rollout serve`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use rollout_coordinator::cli::{self, Action, Connection, Output};
use rollout_coordinator::config::CoordinatorConfig;
use tokio_util::sync::CancellationToken;

/// jemalloc, with the options of `.cargo/config.toml` built in (one arena, no
/// thread caches); `_RJEM_MALLOC_CONF` overrides them when the process starts,
/// as the packaged service does with per-CPU arenas and thread caches.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Rolling deploys across a fleet, health-gated, with automatic rollback.
#[derive(Debug, Parser)]
#[command(name = "rollout", version, about)]
struct Cli {
    /// Coordinator URL.
    #[arg(
        long,
        global = true,
        env = "ROLLOUT_COORDINATOR",
        default_value = "https://127.0.0.1:7443"
    )]
    coordinator: String,
    /// Directory with ca.pem, operator.pem and operator.key (from `rollout certs init`).
    #[arg(long, global = true, env = "ROLLOUT_CERTS")]
    certs: Option<PathBuf>,
    /// Plaintext, no certificates: throw-away local setups only.
    #[arg(long, global = true)]
    insecure_dev: bool,
    /// How long to wait for the coordinator to start answering a request
    /// before failing (uploads, pings and fleet rollbacks are bounded by
    /// their own size or timeout instead).
    #[arg(long, global = true, default_value = "30s", value_parser = humantime::parse_duration)]
    answer_timeout: std::time::Duration,
    /// Output format of listings.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the coordinator daemon.
    Serve {
        /// Config file.
        #[arg(long, default_value = "/etc/rollout/coordinator.toml")]
        config: PathBuf,
        /// Listen address (overrides the config).
        #[arg(long)]
        listen: Option<String>,
        /// Log format (overrides the config's [log] format).
        #[arg(long, value_parser = ["human", "json"])]
        log_format: Option<String>,
    },
    /// A local fleet in one command: a coordinator and agents on loopback with a
    /// throw-away CA; deploys v1, rolls out v2, then an unhealthy v3 that is
    /// rolled back automatically. Runs until Ctrl-C.
    Dev {
        /// Number of agents.
        #[arg(long, default_value_t = 5)]
        agents: usize,
        /// Working directory (default: a new directory under the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where rollout-agent and sample-service are (default: next to this binary).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Exit after the demo (exit 0 only if v2 reached every host and v3 was rolled back).
        #[arg(long)]
        exit_after_demo: bool,
    },
    /// Release signing (ed25519).
    Release {
        #[command(subcommand)]
        cmd: ReleaseCmd,
    },
    /// Certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Start a rollout from a release spec; prints its id.
    Deploy {
        /// Release spec (TOML).
        spec: PathBuf,
        /// Stream progress until it ends; exit 0 only on success.
        #[arg(long)]
        wait: bool,
    },
    /// Dry run: which hosts in which batch.
    Plan {
        /// Release spec (TOML).
        spec: PathBuf,
    },
    /// Rollouts, or one rollout.
    Status {
        /// Rollout id.
        id: Option<String>,
    },
    /// Live progress of a rollout until it ends; exit 0 only on success.
    Watch {
        /// Rollout id.
        id: String,
    },
    /// Pause a rollout between batches.
    Pause {
        /// Rollout id.
        id: String,
    },
    /// Resume a paused rollout.
    Resume {
        /// Rollout id.
        id: String,
    },
    /// Continue a rollout waiting after a canary stage.
    Promote {
        /// Rollout id.
        id: String,
    },
    /// Stop a rollout and roll back the hosts it changed.
    Abort {
        /// Rollout id.
        id: String,
    },
    /// Roll a service back on every host that runs it.
    Rollback {
        /// Service.
        service: String,
        /// Release to return to (default: each host's last known good).
        #[arg(long)]
        to: Option<String>,
    },
    /// Hosts: labels, connection, release, phase, health, CPU, memory;
    /// `rollout hosts remove NAME` revokes one.
    Hosts {
        #[command(subcommand)]
        cmd: Option<cli::tokens::HostsCmd>,
    },
    /// Join tokens for `rollout-agent join`.
    Token {
        #[command(subcommand)]
        cmd: cli::tokens::TokenCmd,
    },
    /// The hosts table, refreshed in place.
    Top {
        /// Time between refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Stop after this many refreshes (0: until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        iterations: u64,
    },
    /// Ping connected hosts over their agent streams, all at once: each
    /// round trip and the fan-out's wall time; exit 0 only if all answered.
    Ping {
        /// Hosts to ping, comma-separated (default: every connected host).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Time allowed for each answer.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Rollouts and per-host history of a service.
    History {
        /// Service.
        service: String,
    },
    /// The event log of a rollout.
    Events {
        /// Rollout id.
        id: String,
    },
    /// Print a shell completion script, e.g. `rollout completions bash`.
    Completions {
        /// Shell to complete for.
        #[arg(value_enum)]
        shell: rollout_cli_docs::Shell,
    },
    /// Write the man pages (rollout.1 and one per subcommand) into a directory.
    Man {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ReleaseCmd {
    /// Create a release-signing key pair: release-signing.key (keep it secret)
    /// and release-signing.pub (goes into agents' trusted_keys).
    Keygen {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an artifact: prints the signature for the spec's [artifact] signature.
    Sign {
        /// Private key from `rollout release keygen`.
        #[arg(long)]
        key: PathBuf,
        /// The artifact (tar.gz).
        artifact: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Create a CA and the coordinator, operator (and optional agent) certificates.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS names or IPs for the coordinator certificate.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Also issue a certificate for this agent host (repeatable).
        #[arg(long = "agent")]
        agents: Vec<String>,
    },
}

fn init_logging(json: bool, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let conn = Connection {
        url: if cli.insecure_dev && cli.coordinator.starts_with("https://") {
            cli.coordinator.replacen("https://", "http://", 1)
        } else {
            cli.coordinator.clone()
        },
        certs: cli.certs.clone(),
        insecure_dev: cli.insecure_dev,
        answer_timeout: cli.answer_timeout,
    };
    let output = match cli.output {
        Format::Table => Output::Table,
        Format::Json => Output::Json,
    };
    let mut stdout = std::io::stdout().lock();
    let out: &mut dyn std::io::Write = &mut stdout;
    match cli.command {
        Cmd::Completions { shell } => {
            let command = <Cli as clap::CommandFactory>::command();
            rollout_cli_docs::write_completions(shell, command, out)?;
            Ok(true)
        }
        Cmd::Man { out: dir } => {
            let command = <Cli as clap::CommandFactory>::command();
            let pages = rollout_cli_docs::write_man_pages(command, &dir)
                .map_err(|e| anyhow::anyhow!("write man pages to {}: {e}", dir.display()))?;
            writeln!(out, "wrote {} man pages to {}", pages.len(), dir.display())?;
            Ok(true)
        }
        Cmd::Serve {
            config,
            listen,
            log_format,
        } => {
            let mut cfg = CoordinatorConfig::load(&config)?;
            if let Some(f) = log_format {
                cfg.log_json = f == "json";
            }
            if let Some(l) = listen {
                cfg.listen = l
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--listen {l:?} is not host:port"))?;
            }
            init_logging(cfg.log_json, &cfg.log_level);
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("bind {}: {e}; is another coordinator running?", cfg.listen)
                })?;
            let cancel = CancellationToken::new();
            let c = cancel.clone();
            tokio::spawn(async move {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                c.cancel();
            });
            rollout_coordinator::server::run(listener, cfg, cli.insecure_dev, cancel).await?;
            Ok(true)
        }
        Cmd::Dev {
            agents,
            dir,
            bin_dir,
            exit_after_demo,
        } => {
            if agents == 0 {
                anyhow::bail!("--agents must be at least 1");
            }
            init_logging(false, "warn,rollout_coordinator::server=error");
            let dir = match dir {
                Some(d) => d,
                None => std::env::temp_dir().join(format!("rollout-dev-{}", std::process::id())),
            };
            let bin_dir = match bin_dir {
                Some(b) => b,
                None => std::env::current_exe()?
                    .parent()
                    .map(std::path::Path::to_path_buf)
                    .unwrap_or_default(),
            };
            let cancel = CancellationToken::new();
            let c = cancel.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                c.cancel();
            });
            let opts = rollout_coordinator::dev::DevOptions {
                agents,
                dir: dir.clone(),
                bin_dir,
                exit_after_demo,
            };
            writeln!(out, "working directory: {}", dir.display())?;
            let outcome = rollout_coordinator::dev::run(opts, out, cancel).await?;
            let ok = outcome.v2_state == "succeeded"
                && outcome.v3_state == "rolled_back"
                && outcome.releases.len() == agents
                && outcome.releases.iter().all(|(_, r)| r == "v2");
            Ok(ok || !exit_after_demo)
        }
        Cmd::Release {
            cmd: ReleaseCmd::Keygen { out: dir },
        } => {
            let public = cli::release::keygen(&dir)?;
            writeln!(
                out,
                "wrote {0}/release-signing.key (secret) and {0}/release-signing.pub",
                dir.display()
            )?;
            writeln!(
                out,
                "add to each agent's config: trusted_keys = [{public:?}]"
            )?;
            Ok(true)
        }
        Cmd::Release {
            cmd: ReleaseCmd::Sign { key, artifact },
        } => {
            let (digest, signature) = cli::release::sign(&key, &artifact)?;
            match output {
                Output::Json => writeln!(
                    out,
                    "{}",
                    serde_json::json!({"digest": digest, "signature": signature})
                )?,
                Output::Table => {
                    writeln!(out, "# {} {digest}", artifact.display())?;
                    writeln!(out, "signature = {signature:?}")?;
                }
            }
            Ok(true)
        }
        Cmd::Certs {
            cmd: CertsCmd::Init { dir, names, agents },
        } => {
            rollout_coordinator::pki::init(&dir, &names, &agents)?;
            writeln!(
                out,
                "wrote a CA and coordinator, operator{} certificates to {}",
                if agents.is_empty() { "" } else { " and agent" },
                dir.display()
            )?;
            writeln!(
                out,
                "keep {}/ca.key offline; the coordinator needs ca.pem, coordinator.pem, coordinator.key",
                dir.display()
            )?;
            Ok(true)
        }
        Cmd::Deploy { spec, wait } => {
            Ok(cli::deploy(&conn, &spec, false, wait, output, out).await?)
        }
        Cmd::Plan { spec } => Ok(cli::deploy(&conn, &spec, true, false, output, out).await?),
        Cmd::Status { id } => {
            cli::status(&conn, id.as_deref(), output, out).await?;
            Ok(true)
        }
        Cmd::Watch { id } => Ok(cli::watch(&conn, &id, output, out).await?),
        Cmd::Pause { id } => cli::act(&conn, Action::Pause, &id, output, out)
            .await
            .map(|()| true)
            .map_err(Into::into),
        Cmd::Resume { id } => cli::act(&conn, Action::Resume, &id, output, out)
            .await
            .map(|()| true)
            .map_err(Into::into),
        Cmd::Promote { id } => cli::act(&conn, Action::Promote, &id, output, out)
            .await
            .map(|()| true)
            .map_err(Into::into),
        Cmd::Abort { id } => cli::act(&conn, Action::Abort, &id, output, out)
            .await
            .map(|()| true)
            .map_err(Into::into),
        Cmd::Rollback { service, to } => {
            Ok(cli::rollback(&conn, &service, to.as_deref(), output, out).await?)
        }
        Cmd::Top {
            interval,
            iterations,
        } => cli::top(&conn, interval, iterations, output, out)
            .await
            .map(|()| true)
            .map_err(Into::into),
        Cmd::Hosts { cmd: Some(cmd) } => cli::tokens::hosts(&conn, cmd, output, out)
            .await
            .map(|()| true)
            .map_err(Into::into),
        Cmd::Token { cmd } => cli::tokens::token(&conn, cmd, output, out)
            .await
            .map(|()| true)
            .map_err(Into::into),
        Cmd::Hosts { cmd: None } => cli::hosts(&conn, output, out)
            .await
            .map(|()| true)
            .map_err(Into::into),
        Cmd::Ping { hosts, timeout } => {
            Ok(cli::ping::ping(&conn, &hosts, timeout, output, out).await?)
        }
        Cmd::History { service } => cli::history(&conn, &service, output, out)
            .await
            .map(|()| true)
            .map_err(Into::into),
        Cmd::Events { id } => cli::events(&conn, &id, output, out)
            .await
            .map(|()| true)
            .map_err(Into::into),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rollout: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rollout: {e:#}");
            ExitCode::FAILURE
        }
    }
}
