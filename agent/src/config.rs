//! The agent's configuration: a TOML file resolved into one validated
//! [`AgentConfig`]. Unknown keys are an error; durations are written like
//! `"10s"`; every default lives here.
//!
//! `[coordinator] keepalive_interval` / `keepalive_timeout` (default 10 s
//! each, 100 ms..1 h) pace the HTTP/2 pings on the connection to the
//! coordinator: a silent partition or a frozen coordinator is noticed, and a
//! reconnect started, within their sum. One connection attempt may take
//! `keepalive_timeout`, at most 5 s, before it is retried.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::release::validate_name;
use crate::update::installer::ArchiveLimits;

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown/mistyped keys.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser message (names the key and line).
        message: String,
    },
    /// A value is out of range.
    #[error("config: {key}: {message}")]
    Invalid {
        /// The key at fault.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    host: Option<String>,
    data_dir: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    trusted_keys: Vec<String>,
    run_as: Option<String>,
    retain_releases: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    report_interval: Option<Duration>,
    max_artifact_bytes: Option<u64>,
    max_unpacked_bytes: Option<u64>,
    metrics_listen: Option<String>,
    coordinator: Option<RawCoordinator>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    testing: RawTesting,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    url: String,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    insecure_dev: bool,
    #[serde(default, with = "humantime_serde")]
    reconnect_min: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    reconnect_max: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    keepalive_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    keepalive_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    format: LogFormat,
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTesting {
    crash_at: Option<String>,
}

/// TLS material for the coordinator connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA that signed the coordinator's certificate.
    pub ca: PathBuf,
    /// This agent's certificate.
    pub cert: PathBuf,
    /// This agent's private key.
    pub key: PathBuf,
}

/// How to reach the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// `https://host:port` (or `http://` with `insecure_dev`).
    pub url: String,
    /// Client certificate and CA; `None` only with `insecure_dev`.
    pub tls: Option<TlsFiles>,
    /// Smallest reconnect backoff.
    pub reconnect_min: Duration,
    /// Largest reconnect backoff.
    pub reconnect_max: Duration,
    /// Time between HTTP/2 pings on the connection to the coordinator.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is given up
    /// (and reconnected): a silent partition or a frozen coordinator is
    /// noticed within `keepalive_interval + keepalive_timeout`.
    pub keepalive_timeout: Duration,
}

/// The validated agent configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// This host's name, as the coordinator knows it.
    pub host: String,
    /// Labels the coordinator selects hosts by.
    pub labels: BTreeMap<String, String>,
    /// Host-level environment: defaults for every service, and what `${NAME}`
    /// expands to in commands and health checks.
    pub env: BTreeMap<String, String>,
    /// Release-signing public keys (base64 ed25519); when any is set, only
    /// releases signed by one of them are staged.
    pub trusted_keys: Vec<String>,
    /// User (name, uid, gid) services and hooks run as; `None`: the agent's own.
    pub run_as: Option<(String, crate::release::RunAs)>,
    /// Root of releases, cache and state.
    pub data_dir: PathBuf,
    /// Local admin socket (mode 0600).
    pub admin_socket: PathBuf,
    /// Unpacked releases kept per service.
    pub retain_releases: usize,
    /// Time between full reports to the coordinator.
    pub report_interval: Duration,
    /// Limits against oversized or hostile artifacts.
    pub archive_limits: ArchiveLimits,
    /// The coordinator; `None` runs the agent standalone (local admin only).
    pub coordinator: Option<CoordinatorConfig>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `info,rollout_agent=debug`, parsed once.
    pub log_level: LogFilter,
    /// Test-only crash point (honoured only in builds with `crash-points`).
    pub crash_at: Option<String>,
    /// Address of the Prometheus `/metrics` endpoint (plain HTTP); `None`: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/rollout";
/// Default releases kept per service.
pub const DEFAULT_RETAIN: usize = 5;
/// Default report interval.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Default time between HTTP/2 pings to the coordinator.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default time a ping to the coordinator may go unanswered.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest keepalive interval or timeout accepted.
pub const MIN_KEEPALIVE: Duration = Duration::from_millis(100);
/// Longest keepalive interval or timeout accepted.
pub const MAX_KEEPALIVE: Duration = Duration::from_secs(3600);
/// Default admin socket file name inside the data directory.
pub const ADMIN_SOCKET_NAME: &str = "admin.sock";

/// The log filter of `[log] level`: a default level and `target=level`
/// directives, comma-separated (`info,rollout_agent=debug`), as written and
/// as parsed. Two filters are equal when their text is.
#[derive(Debug, Clone)]
pub struct LogFilter {
    text: String,
    targets: tracing_subscriber::filter::Targets,
}

impl LogFilter {
    /// Parses a filter. A bare word must be a level: read as a target, a
    /// misspelt level (`inof`) would silently turn every other log line off.
    pub fn parse(level: &str) -> Result<Self, ConfigError> {
        const FIX: &str = "use a level (off, error, warn, info, debug, trace), optionally followed by target=level directives, e.g. \"info,rollout_agent=debug\"";
        let bad = |why: String| {
            invalid(
                "log.level",
                format!("{level:?} is not a log filter: {why}; {FIX}"),
            )
        };
        for part in level.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(bad("it has an empty directive".into()));
            }
            if !part.contains('=') && part.parse::<tracing::level_filters::LevelFilter>().is_err() {
                return Err(bad(format!("{part:?} is not a level")));
            }
        }
        let targets = level.parse().map_err(|e| bad(format!("{e}")))?;
        Ok(LogFilter {
            text: level.to_string(),
            targets,
        })
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed filter, for the logging layer.
    pub fn targets(&self) -> tracing_subscriber::filter::Targets {
        self.targets.clone()
    }
}

impl PartialEq for LogFilter {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for LogFilter {}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// A keepalive setting, or its default; refused outside
/// [`MIN_KEEPALIVE`]..=[`MAX_KEEPALIVE`].
fn keepalive(key: &str, v: Option<Duration>, default: Duration) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if v < MIN_KEEPALIVE || v > MAX_KEEPALIVE {
        return Err(invalid(
            key,
            format!(
                "{} is out of range: use 100ms..1h (default {}); 0 would turn off the check that notices a lost coordinator",
                humantime::format_duration(v),
                humantime::format_duration(default)
            ),
        ));
    }
    Ok(v)
}

impl AgentConfig {
    /// Reads and validates a config file. `default_host` is used when the file
    /// names no host (the binary passes the system host name).
    pub fn load(path: &Path, default_host: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, default_host)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path, default_host: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let host = raw.host.unwrap_or_else(|| default_host.to_string());
        validate_name("host", &host).map_err(|e| invalid("host", e.reason))?;
        let data_dir = raw
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if !data_dir.is_absolute() {
            return Err(invalid(
                "data_dir",
                format!("{} must be an absolute path", data_dir.display()),
            ));
        }
        let admin_socket = raw
            .admin_socket
            .unwrap_or_else(|| data_dir.join(ADMIN_SOCKET_NAME));
        for (i, k) in raw.trusted_keys.iter().enumerate() {
            crate::update::installer::parse_public_key(k)
                .map_err(|e| invalid(&format!("trusted_keys[{i}]"), e.to_string()))?;
        }
        let run_as = match raw.run_as {
            None => None,
            Some(name) => {
                let user = nix::unistd::User::from_name(&name)
                    .map_err(|e| invalid("run_as", format!("cannot look up user {name:?}: {e}")))?
                    .ok_or_else(|| {
                        invalid(
                            "run_as",
                            format!("no user {name:?} on this host; create it (e.g. useradd --system {name}) or remove run_as"),
                        )
                    })?;
                Some((
                    name,
                    crate::release::RunAs {
                        uid: user.uid.as_raw(),
                        gid: user.gid.as_raw(),
                    },
                ))
            }
        };
        let retain_releases = raw.retain_releases.unwrap_or(DEFAULT_RETAIN);
        if retain_releases < 2 {
            return Err(invalid(
                "retain_releases",
                "must be at least 2 (the current and the previous release)",
            ));
        }
        let report_interval = raw.report_interval.unwrap_or(DEFAULT_REPORT_INTERVAL);
        if report_interval < Duration::from_millis(100) {
            return Err(invalid("report_interval", "must be at least 100ms"));
        }
        let mut archive_limits = ArchiveLimits::default();
        if let Some(v) = raw.max_artifact_bytes {
            if v == 0 {
                return Err(invalid("max_artifact_bytes", "must be positive"));
            }
            archive_limits.max_artifact_bytes = v;
        }
        if let Some(v) = raw.max_unpacked_bytes {
            if v == 0 {
                return Err(invalid("max_unpacked_bytes", "must be positive"));
            }
            archive_limits.max_unpacked_bytes = v;
        }
        let metrics_listen = match raw.metrics_listen {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| {
                invalid(
                    "metrics_listen",
                    format!("{a:?} is not host:port, e.g. \"127.0.0.1:9101\""),
                )
            })?),
        };
        let coordinator = match raw.coordinator {
            None => None,
            Some(c) => {
                let tls = match (c.insecure_dev, c.ca, c.cert, c.key) {
                    (true, None, None, None) => None,
                    (true, ..) => {
                        return Err(invalid(
                            "coordinator.insecure_dev",
                            "is set together with ca/cert/key; drop insecure_dev to use TLS",
                        ));
                    }
                    (false, Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key }),
                    (false, ..) => {
                        return Err(invalid(
                            "coordinator",
                            "needs ca, cert and key (mutual TLS); for a throw-away local setup only, set insecure_dev = true",
                        ));
                    }
                };
                let scheme_ok = if tls.is_some() {
                    c.url.starts_with("https://")
                } else {
                    c.url.starts_with("http://")
                };
                if !scheme_ok {
                    return Err(invalid(
                        "coordinator.url",
                        format!(
                            "{:?} must start with {}",
                            c.url,
                            if tls.is_some() { "https://" } else { "http://" }
                        ),
                    ));
                }
                let reconnect_min = c.reconnect_min.unwrap_or(Duration::from_millis(500));
                let reconnect_max = c.reconnect_max.unwrap_or(Duration::from_secs(30));
                if reconnect_min.is_zero() || reconnect_max < reconnect_min {
                    return Err(invalid(
                        "coordinator.reconnect_max",
                        "must be at least reconnect_min, and reconnect_min above zero",
                    ));
                }
                let keepalive_interval = keepalive(
                    "coordinator.keepalive_interval",
                    c.keepalive_interval,
                    DEFAULT_KEEPALIVE_INTERVAL,
                )?;
                let keepalive_timeout = keepalive(
                    "coordinator.keepalive_timeout",
                    c.keepalive_timeout,
                    DEFAULT_KEEPALIVE_TIMEOUT,
                )?;
                Some(CoordinatorConfig {
                    url: c.url,
                    tls,
                    reconnect_min,
                    reconnect_max,
                    keepalive_interval,
                    keepalive_timeout,
                })
            }
        };
        let log_level = LogFilter::parse(raw.log.level.as_deref().unwrap_or("info"))?;
        Ok(AgentConfig {
            host,
            labels: raw.labels,
            env: raw.env,
            trusted_keys: raw.trusted_keys,
            run_as,
            data_dir,
            admin_socket,
            retain_releases,
            report_interval,
            archive_limits,
            coordinator,
            log_format: raw.log.format,
            log_level,
            crash_at: raw.testing.crash_at,
            metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(s, Path::new("agent.toml"), "node-1")
    }

    #[test]
    fn log_level_takes_a_level_and_target_directives() {
        for ok in ["info", "debug,rollout_agent=trace", "warn, sled=off", "off"] {
            let c = parse(&format!("[log]\nlevel = {ok:?}")).expect(ok);
            assert_eq!(c.log_level.as_str(), ok);
        }
        for bad in ["inof", "info,rollout_agent=loud", "", "info,,"] {
            let e = parse(&format!("[log]\nlevel = {bad:?}"))
                .expect_err(bad)
                .to_string();
            assert!(
                e.contains("log.level") && e.contains("e.g. \"info,rollout_agent=debug\""),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn empty_config_takes_every_default() {
        let c = parse("").expect("defaults");
        assert_eq!(c.host, "node-1");
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.admin_socket, PathBuf::from("/var/lib/rollout/admin.sock"));
        assert_eq!(c.retain_releases, DEFAULT_RETAIN);
        assert_eq!(c.report_interval, DEFAULT_REPORT_INTERVAL);
        assert!(c.coordinator.is_none());
        assert_eq!(c.log_format, LogFormat::Human);
        assert_eq!(c.metrics_listen, None, "metrics are off by default");
        let c = parse("metrics_listen = \"127.0.0.1:9101\"").expect("metrics");
        assert_eq!(c.metrics_listen, Some(([127, 0, 0, 1], 9101).into()));
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"
            host = "web-1"
            data_dir = "/srv/rollout"
            retain_releases = 3
            report_interval = "2s"
            max_artifact_bytes = 1000
            [labels]
            role = "web"
            [coordinator]
            url = "https://coord:7443"
            ca = "/etc/rollout/ca.pem"
            cert = "/etc/rollout/agent.pem"
            key = "/etc/rollout/agent.key"
            reconnect_max = "10s"
            [log]
            format = "json"
            "#,
        )
        .expect("parses");
        assert_eq!(c.host, "web-1");
        assert_eq!(c.labels.get("role").map(String::as_str), Some("web"));
        assert_eq!(c.admin_socket, PathBuf::from("/srv/rollout/admin.sock"));
        assert_eq!(c.archive_limits.max_artifact_bytes, 1000);
        let coord = c.coordinator.expect("coordinator");
        assert!(coord.tls.is_some());
        assert_eq!(coord.reconnect_max, Duration::from_secs(10));
        assert_eq!(coord.keepalive_interval, DEFAULT_KEEPALIVE_INTERVAL);
        assert_eq!(coord.keepalive_timeout, DEFAULT_KEEPALIVE_TIMEOUT);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn keepalive_is_set_and_bounded() {
        let base = "[coordinator]\nurl = \"http://c:1\"\ninsecure_dev = true\n";
        let c = parse(&format!(
            "{base}keepalive_interval = \"1s\"\nkeepalive_timeout = \"500ms\""
        ))
        .expect("parses");
        let coord = c.coordinator.expect("coordinator");
        assert_eq!(coord.keepalive_interval, Duration::from_secs(1));
        assert_eq!(coord.keepalive_timeout, Duration::from_millis(500));
        for (line, key) in [
            (
                "keepalive_timeout = \"0s\"",
                "coordinator.keepalive_timeout",
            ),
            (
                "keepalive_interval = \"0s\"",
                "coordinator.keepalive_interval",
            ),
            (
                "keepalive_interval = \"50ms\"",
                "coordinator.keepalive_interval",
            ),
            (
                "keepalive_timeout = \"2h\"",
                "coordinator.keepalive_timeout",
            ),
        ] {
            let err = parse(&format!("{base}{line}")).expect_err(line).to_string();
            assert!(
                err.contains(key) && err.contains("100ms..1h"),
                "{line}: {err}"
            );
        }
        let err = parse(&format!("{base}keepalive_timeout = \"soon\""))
            .expect_err("not a duration")
            .to_string();
        assert!(err.contains("keepalive_timeout"), "{err}");
    }

    #[test]
    fn mistakes_are_refused_with_the_key_named() {
        let cases = [
            ("hots = \"x\"", "hots"),
            ("retain_releases = 1", "retain_releases"),
            ("retain_releases = \"five\"", "retain_releases"),
            ("data_dir = \"relative\"", "data_dir"),
            ("report_interval = \"soon\"", "report_interval"),
            ("host = \"../etc\"", "host"),
            ("[coordinator]\nurl = \"https://c:1\"", "mutual TLS"),
            (
                "[coordinator]\nurl = \"https://c:1\"\ninsecure_dev = true",
                "http://",
            ),
            (
                "[coordinator]\nurl = \"http://c:1\"\ninsecure_dev = true\nreconnect_min = \"5s\"\nreconnect_max = \"1s\"",
                "reconnect",
            ),
            ("[log]\nformat = \"xml\"", "format"),
            ("trusted_keys = [\"not-a-key\"]", "trusted_keys[0]"),
            ("run_as = \"no-such-user-here\"", "run_as"),
            ("metrics_listen = \"9101\"", "metrics_listen"),
        ];
        for (text, needle) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
