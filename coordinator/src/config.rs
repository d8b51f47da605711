//! The coordinator's configuration (`coordinator.toml`), validated once.
//! Unknown keys are an error.
//!
//! `[agents] keepalive_interval` / `keepalive_timeout` (default 10 s each,
//! 100 ms..1 h) pace the HTTP/2 pings on every agent's connection: an agent
//! that is cut off without a word (partition) or frozen is dropped within
//! their sum, and its commands in flight fail as unreachable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Bad TOML or keys.
    #[error("config {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A bad value.
    #[error("config: {key}: {message}")]
    Invalid {
        /// Key.
        key: String,
        /// What to do.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    max_artifact_bytes: Option<u64>,
    artifact_cache_bytes: Option<u64>,
    metrics_listen: Option<String>,
    tls: Option<RawTls>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    agents: RawAgents,
    #[serde(default)]
    testing: RawTesting,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTesting {
    crash_at: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    #[serde(default, with = "humantime_serde")]
    keepalive_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    keepalive_timeout: Option<Duration>,
}

/// `[agents]`: HTTP/2 keepalive on the agents' connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between pings to each agent.
    pub interval: Duration,
    /// How long a ping may go unanswered before the agent's connection is
    /// closed (it counts as disconnected).
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Keepalive {
    /// Shortest interval or timeout accepted.
    pub const MIN: Duration = Duration::from_millis(100);
    /// Longest interval or timeout accepted.
    pub const MAX: Duration = Duration::from_secs(3600);

    fn from_raw(raw: &RawAgents) -> Result<Self, ConfigError> {
        let d = Keepalive::default();
        let check = |key: &str, v: Option<Duration>, default: Duration| {
            let v = v.unwrap_or(default);
            if v < Self::MIN || v > Self::MAX {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    message: format!(
                        "{} is out of range: use 100ms..1h (default {}); 0 would turn off the check that notices a lost agent",
                        humantime::format_duration(v),
                        humantime::format_duration(default)
                    ),
                });
            }
            Ok(v)
        };
        Ok(Keepalive {
            interval: check(
                "agents.keepalive_interval",
                raw.keepalive_interval,
                d.interval,
            )?,
            timeout: check("agents.keepalive_timeout", raw.keepalive_timeout, d.timeout)?,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

/// TLS material of the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA that signs agents and operators.
    pub ca: PathBuf,
    /// The coordinator's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA's private key: lets the coordinator sign the CSRs of agents
    /// joining with a token (`rollout-agent join`). `None`: joining is off and
    /// agent certificates come from `rollout certs init --agent`.
    pub ca_key: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// State and artifacts.
    pub data_dir: PathBuf,
    /// Largest artifact upload.
    pub max_artifact_bytes: u64,
    /// Bytes of artifact chunks kept in memory and shared among agents
    /// downloading the same release (0: none).
    pub artifact_cache_bytes: u64,
    /// mTLS material; `None` only with `--insecure-dev`.
    pub tls: Option<TlsFiles>,
    /// `human` or `json`.
    pub log_json: bool,
    /// Tracing filter.
    pub log_level: String,
    /// Address of the Prometheus `/metrics` endpoint (plain HTTP); `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// `[agents]` keepalive of the agents' connections.
    pub agent_keepalive: Keepalive,
    /// `[testing] crash_at`: a test-only crash point, one of
    /// [`crate::store::CRASH_POINTS`]; honoured only in builds with the
    /// `crash-points` feature (otherwise ignored with a warning at start).
    pub crash_at: Option<String>,
}

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/rollout-coordinator";

/// Default `artifact_cache_bytes`: 64 MiB of chunks shared among downloads.
pub const DEFAULT_ARTIFACT_CACHE_BYTES: u64 = 64 << 20;

impl CoordinatorConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates text (`path` only for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let listen_s = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_s.parse().map_err(|_| ConfigError::Invalid {
            key: "listen".into(),
            message: format!("{listen_s:?} is not host:port, e.g. \"0.0.0.0:7443\""),
        })?;
        let log_json = match raw.log.format.as_deref() {
            None | Some("human") => false,
            Some("json") => true,
            Some(x) => {
                return Err(ConfigError::Invalid {
                    key: "log.format".into(),
                    message: format!("{x:?}: use \"human\" or \"json\""),
                });
            }
        };
        let metrics_listen = match raw.metrics_listen {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| ConfigError::Invalid {
                key: "metrics_listen".into(),
                message: format!("{a:?} is not host:port, e.g. \"127.0.0.1:9102\""),
            })?),
        };
        if let Some(p) = raw.testing.crash_at.as_deref()
            && !crate::store::CRASH_POINTS.contains(&p)
        {
            return Err(ConfigError::Invalid {
                key: "testing.crash_at".into(),
                message: format!(
                    "{p:?} is not a crash point; use one of {}",
                    crate::store::CRASH_POINTS.join(", ")
                ),
            });
        }
        let agent_keepalive = Keepalive::from_raw(&raw.agents)?;
        Ok(CoordinatorConfig {
            agent_keepalive,
            listen,
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            max_artifact_bytes: raw.max_artifact_bytes.unwrap_or(4 << 30),
            artifact_cache_bytes: raw
                .artifact_cache_bytes
                .unwrap_or(DEFAULT_ARTIFACT_CACHE_BYTES),
            tls: raw.tls.map(|t| TlsFiles {
                ca: t.ca,
                cert: t.cert,
                key: t.key,
                ca_key: t.ca_key,
            }),
            log_json,
            log_level: raw.log.level.unwrap_or_else(|| "info".into()),
            metrics_listen,
            crash_at: raw.testing.crash_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = CoordinatorConfig::parse("", Path::new("c.toml")).expect("defaults");
        assert_eq!(c.listen.port(), 7443);
        assert!(c.tls.is_none());
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.agent_keepalive, Keepalive::default());
        let text = "[agents]\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"2s\"";
        let c = CoordinatorConfig::parse(text, Path::new("c.toml")).expect("keepalive");
        assert_eq!(c.agent_keepalive.interval, Duration::from_secs(1));
        assert_eq!(c.agent_keepalive.timeout, Duration::from_secs(2));
        for text in [
            "[agents]\nkeepalive_timeout = \"0s\"",
            "[agents]\nkeepalive_interval = \"10ms\"",
            "[agents]\nkeepalive_interval = \"2h\"",
        ] {
            let e = CoordinatorConfig::parse(text, Path::new("c.toml"))
                .expect_err(text)
                .to_string();
            assert!(
                e.contains("agents.keepalive_") && e.contains("100ms..1h"),
                "{text}: {e}"
            );
        }
        let text = "metrics_listen = \"127.0.0.1:9102\"";
        let c = CoordinatorConfig::parse(text, Path::new("c.toml")).expect("metrics");
        assert_eq!(c.metrics_listen, Some(([127, 0, 0, 1], 9102).into()));
        let text = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nca_key = \"d\"";
        let c = CoordinatorConfig::parse(text, Path::new("c.toml")).expect("ca_key");
        assert_eq!(
            c.tls.and_then(|t| t.ca_key),
            Some(PathBuf::from("d")),
            "ca_key enables joining"
        );
        for (text, needle) in [
            ("lisen = \"x\"", "lisen"),
            ("listen = \"nope\"", "listen"),
            ("metrics_listen = \"9102\"", "metrics_listen"),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("[tls]\nca = \"a\"", "cert"),
            ("[testing]\ncrash_at = \"nowhere\"", "testing.crash_at"),
        ] {
            let e = CoordinatorConfig::parse(text, Path::new("c.toml"))
                .expect_err(text)
                .to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
