//! Domain types of a release: the artifact and the service definition that
//! runs it, converted once from the wire types and validated.
//!
//! They are persisted with each staged release, so a rollback restores the
//! previous release's code *and* its definition.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rollout_proto::pb;
use serde::{Deserialize, Serialize};

/// Default timeout of a hook or exec check that does not name one.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Default grace between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A definition that cannot be used, with the field at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid release definition: {field}: {reason}")]
pub struct InvalidDefinition {
    /// Dotted path of the field at fault, e.g. `health_checks[0].http.url`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidDefinition {
    InvalidDefinition {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A sha256 content digest, written `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Lowercase hex without the `sha256:` prefix; the artifact cache's file name.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = InvalidDefinition;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s.strip_prefix("sha256:").ok_or_else(|| {
            invalid(
                "artifact.digest",
                format!("{s:?} must look like sha256:<64 hex digits>"),
            )
        })?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|e| {
            invalid(
                "artifact.digest",
                format!("{s:?} is not sha256:<64 hex digits> ({e})"),
            )
        })?;
        Ok(Digest(out))
    }
}

impl TryFrom<String> for Digest {
    type Error = InvalidDefinition;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

/// The artifact of a release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// Content digest; the artifact is verified against it before unpacking.
    pub digest: Digest,
    /// Announced size in bytes (0 = unknown); lets the agent refuse an
    /// oversized artifact before fetching it.
    pub size: u64,
    /// Optional signature over the digest (checked when keys are configured).
    pub signature: Option<String>,
}

/// A command run by the agent (hook or exec check).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Program and arguments; a relative program containing `/` is resolved
    /// against the release directory.
    pub argv: Vec<String>,
    /// Killed past this.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// Hooks of a release, run around the switch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hooks {
    /// Before the running service is stopped.
    pub before_stop: Option<Command>,
    /// After the stop, before `current` is switched.
    pub before_switch: Option<Command>,
    /// After the switch, before the service is started.
    pub after_switch: Option<Command>,
}

/// When the agent restarts an exec-supervised process that exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whatever the exit status.
    Always,
    /// Restart after a non-zero exit or a signal.
    OnFailure,
    /// Never restart; an exit makes the service unhealthy.
    Never,
}

/// How the service of a release is run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Supervision {
    /// The agent runs the process itself, from the release directory.
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
        /// What to do when it exits.
        restart: RestartPolicy,
        /// Grace between SIGTERM and SIGKILL.
        #[serde(with = "humantime_serde")]
        stop_timeout: Duration,
    },
    /// A systemd unit (pointing at `<service>/current`) restarted via systemctl.
    Systemd {
        /// Unit name, e.g. `web.service`.
        unit: String,
    },
    /// The release's own scripts start and stop the service.
    Hooks {
        /// Start script.
        start: Option<Command>,
        /// Stop script.
        stop: Option<Command>,
    },
}

/// What a health check probes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// HTTP GET; passes on the expected status (any 2xx when `None`) and body.
    Http {
        /// `http://` URL.
        url: String,
        /// Exact status expected, or any 2xx.
        expect_status: Option<u16>,
        /// Substring the body must contain; a body over
        /// [`crate::health::probe::MAX_HTTP_BODY`] fails the check.
        body_contains: Option<String>,
    },
    /// TCP connect to `host:port`.
    Tcp {
        /// `host:port`.
        address: String,
    },
    /// A command that must exit 0.
    Exec(Command),
}

/// One health check with its cadence and thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Name shown in reports and reasons.
    pub name: String,
    /// What to probe.
    pub kind: CheckKind,
    /// Time between probes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A probe taking longer fails.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures before the check is failing.
    pub failure_threshold: u32,
    /// Consecutive successes before the check is passing.
    pub success_threshold: u32,
}

/// Resource ceilings of the service process tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// RSS ceiling in bytes.
    pub max_rss_bytes: Option<u64>,
    /// CPU ceiling as a share of one core, in percent.
    pub max_cpu_percent: Option<f64>,
    /// Consecutive samples over a ceiling before it counts.
    pub sustained_samples: u32,
    /// RSS regression gate: multiple of the previous release's steady state.
    #[serde(default)]
    pub max_rss_ratio: Option<f64>,
    /// CPU regression gate: multiple of the previous release's steady state.
    #[serde(default)]
    pub max_cpu_ratio: Option<f64>,
}

/// The unprivileged user services and hooks run as (agent config `run_as`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Everything that defines how one release of one service runs on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceDefinition {
    /// Service name: `[A-Za-z0-9._-]`, used as a directory name.
    pub service: String,
    /// Release id: `[A-Za-z0-9._-]`, used as a directory name.
    pub release: String,
    /// The artifact to unpack.
    pub artifact: Artifact,
    /// How the service runs.
    pub supervision: Supervision,
    /// Extra environment for the service and its hooks.
    pub env: BTreeMap<String, String>,
    /// Hooks around the switch.
    pub hooks: Hooks,
    /// Health checks; all must pass.
    pub health_checks: Vec<HealthCheck>,
    /// Resource ceilings.
    pub thresholds: Thresholds,
    /// Healthy continuously for this long to pass verify.
    #[serde(with = "humantime_serde")]
    pub min_healthy_time: Duration,
    /// Verify fails when not passed within this long after start.
    #[serde(with = "humantime_serde")]
    pub healthy_deadline: Duration,
    /// Probation ends in rollback without a commit within this long.
    #[serde(with = "humantime_serde")]
    pub commit_deadline: Duration,
    /// Host setting, never persisted: the user the service and its hooks run as.
    #[serde(skip)]
    pub run_as: Option<RunAs>,
}

/// Default `min_healthy_time`.
pub const DEFAULT_MIN_HEALTHY_TIME: Duration = Duration::from_secs(10);
/// Default `healthy_deadline`.
pub const DEFAULT_HEALTHY_DEADLINE: Duration = Duration::from_secs(5 * 60);
/// Default `commit_deadline`.
pub const DEFAULT_COMMIT_DEADLINE: Duration = Duration::from_secs(10 * 60);

/// Checks a name used as a directory name: non-empty, at most 128 bytes,
/// `[A-Za-z0-9._-]`, not `.`/`..`.
pub fn validate_name(field: &str, name: &str) -> Result<(), InvalidDefinition> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{name:?} must be 1-128 characters of A-Z a-z 0-9 . _ - and not start with '.'"
            ),
        ))
    }
}

fn ms(v: u64, default: Duration) -> Duration {
    if v == 0 {
        default
    } else {
        Duration::from_millis(v)
    }
}

fn command(field: &str, c: Option<pb::Command>) -> Result<Option<Command>, InvalidDefinition> {
    match c {
        None => Ok(None),
        Some(c) if c.argv.is_empty() => Ok(None),
        Some(c) => {
            if c.argv[0].is_empty() {
                return Err(invalid(format!("{field}.argv[0]"), "program is empty"));
            }
            Ok(Some(Command {
                argv: c.argv,
                timeout: ms(c.timeout_ms, DEFAULT_COMMAND_TIMEOUT),
            }))
        }
    }
}

impl TryFrom<pb::ServiceDefinition> for ServiceDefinition {
    type Error = InvalidDefinition;

    fn try_from(d: pb::ServiceDefinition) -> Result<Self, Self::Error> {
        validate_name("service", &d.service)?;
        validate_name("release", &d.release)?;
        let a = d
            .artifact
            .ok_or_else(|| invalid("artifact", "missing; a release needs an artifact"))?;
        let artifact = Artifact {
            digest: a.digest.parse()?,
            size: a.size,
            signature: (!a.signature.is_empty()).then_some(a.signature),
        };
        let supervision = match d.supervision {
            Some(pb::service_definition::Supervision::Exec(e)) => {
                if e.argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(invalid("exec.argv", "is empty; name the program to run"));
                }
                Supervision::Exec {
                    argv: e.argv,
                    restart: match pb::RestartPolicy::try_from(e.restart) {
                        Ok(pb::RestartPolicy::Always) => RestartPolicy::Always,
                        Ok(pb::RestartPolicy::Never) => RestartPolicy::Never,
                        Ok(pb::RestartPolicy::OnFailure | pb::RestartPolicy::Unspecified) => {
                            RestartPolicy::OnFailure
                        }
                        Err(_) => {
                            return Err(invalid("exec.restart", "unknown restart policy"));
                        }
                    },
                    stop_timeout: ms(e.stop_timeout_ms, DEFAULT_STOP_TIMEOUT),
                }
            }
            Some(pb::service_definition::Supervision::Systemd(s)) => {
                if s.unit.is_empty() || s.unit.contains('/') {
                    return Err(invalid(
                        "systemd.unit",
                        "must name a unit, e.g. web.service",
                    ));
                }
                Supervision::Systemd { unit: s.unit }
            }
            Some(pb::service_definition::Supervision::HooksOnly(h)) => Supervision::Hooks {
                start: command("hooks_only.start", h.start)?,
                stop: command("hooks_only.stop", h.stop)?,
            },
            None => {
                return Err(invalid(
                    "supervision",
                    "missing; choose exec, systemd or hooks_only",
                ));
            }
        };
        let hooks = match d.hooks {
            None => Hooks::default(),
            Some(h) => Hooks {
                before_stop: command("hooks.before_stop", h.before_stop)?,
                before_switch: command("hooks.before_switch", h.before_switch)?,
                after_switch: command("hooks.after_switch", h.after_switch)?,
            },
        };
        let mut health_checks = Vec::with_capacity(d.health_checks.len());
        for (i, c) in d.health_checks.into_iter().enumerate() {
            let field = format!("health_checks[{i}]");
            let kind = match c.kind {
                Some(pb::health_check::Kind::Http(h)) => {
                    if !h.url.starts_with("http://") {
                        return Err(invalid(
                            format!("{field}.http.url"),
                            format!("{:?} must be an http:// URL", h.url),
                        ));
                    }
                    let expect_status = match h.expect_status {
                        0 => None,
                        s @ 100..=599 => Some(s as u16),
                        s => {
                            return Err(invalid(
                                format!("{field}.http.expect_status"),
                                format!("{s} is not an HTTP status"),
                            ));
                        }
                    };
                    CheckKind::Http {
                        url: h.url,
                        expect_status,
                        body_contains: (!h.body_contains.is_empty()).then_some(h.body_contains),
                    }
                }
                Some(pb::health_check::Kind::Tcp(t)) => {
                    if t.address.is_empty() {
                        return Err(invalid(format!("{field}.tcp.address"), "is empty"));
                    }
                    CheckKind::Tcp { address: t.address }
                }
                Some(pb::health_check::Kind::Exec(e)) => {
                    match command(&format!("{field}.exec"), Some(e))? {
                        Some(cmd) => CheckKind::Exec(cmd),
                        None => return Err(invalid(format!("{field}.exec.argv"), "is empty")),
                    }
                }
                None => {
                    return Err(invalid(
                        format!("{field}.kind"),
                        "missing; choose http, tcp or exec",
                    ));
                }
            };
            health_checks.push(HealthCheck {
                name: if c.name.is_empty() {
                    format!("check-{i}")
                } else {
                    c.name
                },
                kind,
                interval: ms(c.interval_ms, Duration::from_secs(2)),
                timeout: ms(c.timeout_ms, Duration::from_secs(2)),
                failure_threshold: c.failure_threshold.max(1),
                success_threshold: c.success_threshold.max(1),
            });
        }
        let t = d.thresholds.unwrap_or_default();
        if t.max_cpu_percent < 0.0 || !t.max_cpu_percent.is_finite() {
            return Err(invalid(
                "thresholds.max_cpu_percent",
                "must be a positive number",
            ));
        }
        for (field, v) in [
            ("thresholds.max_rss_ratio", t.max_rss_ratio),
            ("thresholds.max_cpu_ratio", t.max_cpu_ratio),
        ] {
            if !v.is_finite() || v < 0.0 || (v > 0.0 && v < 1.0) {
                return Err(invalid(
                    field,
                    "must be 0 (off) or a multiple of at least 1, e.g. 1.5",
                ));
            }
        }
        let thresholds = Thresholds {
            max_rss_ratio: (t.max_rss_ratio > 0.0).then_some(t.max_rss_ratio),
            max_cpu_ratio: (t.max_cpu_ratio > 0.0).then_some(t.max_cpu_ratio),
            max_rss_bytes: (t.max_rss_bytes > 0).then_some(t.max_rss_bytes),
            max_cpu_percent: (t.max_cpu_percent > 0.0).then_some(t.max_cpu_percent),
            sustained_samples: if t.sustained_samples == 0 {
                3
            } else {
                t.sustained_samples
            },
        };
        Ok(ServiceDefinition {
            service: d.service,
            release: d.release,
            artifact,
            supervision,
            env: d.env.into_iter().collect(),
            hooks,
            health_checks,
            thresholds,
            min_healthy_time: if d.min_healthy_time_ms == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(d.min_healthy_time_ms)
            },
            healthy_deadline: ms(d.healthy_deadline_ms, DEFAULT_HEALTHY_DEADLINE),
            commit_deadline: ms(d.commit_deadline_ms, DEFAULT_COMMIT_DEADLINE),
            run_as: None,
        })
    }
}

/// Replaces `${NAME}` with `env[NAME]`; unknown names are left as written.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                match env.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&rest[start..start + 3 + end]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The definition as it runs on this host: the host's environment under the
/// definition's own, and `${NAME}` expanded in commands and health checks.
pub fn with_host_env(
    mut def: ServiceDefinition,
    host_env: &BTreeMap<String, String>,
) -> ServiceDefinition {
    let mut env = host_env.clone();
    env.extend(std::mem::take(&mut def.env));
    let x = |v: &mut Vec<String>| {
        for a in v.iter_mut() {
            *a = expand(a, &env);
        }
    };
    let cmd = |c: &mut Option<Command>| {
        if let Some(c) = c {
            for a in c.argv.iter_mut() {
                *a = expand(a, &env);
            }
        }
    };
    match &mut def.supervision {
        Supervision::Exec { argv, .. } => x(argv),
        Supervision::Systemd { unit } => *unit = expand(unit, &env),
        Supervision::Hooks { start, stop } => {
            cmd(start);
            cmd(stop);
        }
    }
    cmd(&mut def.hooks.before_stop);
    cmd(&mut def.hooks.before_switch);
    cmd(&mut def.hooks.after_switch);
    for c in def.health_checks.iter_mut() {
        match &mut c.kind {
            CheckKind::Http { url, .. } => *url = expand(url, &env),
            CheckKind::Tcp { address } => *address = expand(address, &env),
            CheckKind::Exec(c) => x(&mut c.argv),
        }
    }
    def.env = env;
    def
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_replaces_known_names_and_keeps_the_rest() {
        let env: BTreeMap<String, String> = [("PORT".to_string(), "8080".to_string())].into();
        assert_eq!(
            expand("http://127.0.0.1:${PORT}/health", &env),
            "http://127.0.0.1:8080/health"
        );
        assert_eq!(expand("${NOPE}-${PORT}", &env), "${NOPE}-8080");
        assert_eq!(expand("a${PORT", &env), "a${PORT");
        assert_eq!(expand("plain", &env), "plain");
    }

    #[test]
    fn digest_round_trips_and_rejects_garbage() {
        let s = format!("sha256:{}", "ab".repeat(32));
        let d: Digest = s.parse().expect("valid digest");
        assert_eq!(d.to_string(), s);
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!(
            format!("md5:{}", "ab".repeat(32))
                .parse::<Digest>()
                .is_err()
        );
        assert!(
            format!("sha256:{}", "zz".repeat(32))
                .parse::<Digest>()
                .is_err()
        );
    }

    #[test]
    fn names_that_could_escape_a_directory_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(validate_name("release", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["v1", "web-2024.11.23_1", "A"] {
            assert!(validate_name("release", good).is_ok(), "{good:?} refused");
        }
    }
}
