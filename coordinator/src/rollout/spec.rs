//! The release spec: the TOML file an operator writes for `rollout deploy
//! spec.toml` (and `rollout plan spec.toml`), parsed once into a validated
//! [`DeploySpec`].
//!
//! Unknown keys are an error everywhere, so a typo never silently falls back to
//! a default. Durations are written like `"10s"`, `"5m"`, `"1h 30m"`.
//!
//! ```toml
//! service = "web"            # required; 1-128 of A-Z a-z 0-9 . _ -, not starting with '.'
//! release = "v2"             # required; same rules (it becomes a directory name on hosts)
//!
//! [artifact]                 # required
//! path = "web-v2.tar.gz"     # required; relative to the spec file's directory; the CLI uploads it
//! digest = "sha256:<hex>"    # optional; when given the file must match it (see `verify_artifact`)
//! signature = "<base64>"     # optional; `rollout release sign` output, required by agents with trusted_keys
//!
//! [run]                      # required; exactly one mode:
//! exec = ["./bin/web", "--port", "8080"]  # the agent runs this argv from the release directory
//! restart = "on-failure"     # exec only: always | on-failure (default) | never
//! stop_timeout = "10s"       # exec only: SIGTERM, then SIGKILL after this (default 10s)
//! # systemd_unit = "web.service"          # or: restart this unit (it points at <service>/current)
//! # start = ["./bin/start.sh"]            # or: hooks mode; the release's scripts start (required)
//! # stop = ["./bin/stop.sh"]              #     and stop (optional) the service; each may also be
//! #                                       #     written { command = [...], timeout = "30s" }
//!
//! [env]                      # optional; extra environment for the service and its hooks
//! PORT = "8080"
//!
//! [hooks]                    # optional; each { command = [argv], timeout = "60s" (default) } or [argv]
//! before_stop = { command = ["./hooks/drain.sh"], timeout = "30s" }
//! before_switch = ["./hooks/migrate.sh"]
//! after_switch = ["./hooks/warm.sh"]
//!
//! [[health]]                 # optional, repeatable; all checks must pass
//! name = "http"              # default "check-<index>"; unique
//! http = "http://127.0.0.1:8080/health"   # exactly one of http (an http:// URL),
//! # tcp = "127.0.0.1:8080"                 # tcp (host:port; the port may be "${PORT}" from the agent's [env])
//! # exec = ["./bin/check"]                 # or exec (argv that must exit 0)
//! expect_status = 200        # http only; default: any 2xx
//! body_contains = "ok"       # http only; a body over 1 MiB fails the check
//! interval = "2s"            # default 2s
//! timeout = "1s"             # default 2s
//! failure_threshold = 3      # consecutive failures before failing; default 3
//! success_threshold = 1      # consecutive successes before passing; default 1
//!
//! [thresholds]               # optional; resource ceilings of the service's process tree (run.exec only)
//! max_rss = "512MiB"         # or integer bytes; units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB
//! max_cpu_percent = 80.0     # share of one core, > 0 (may exceed 100 on several cores)
//! sustained_samples = 3      # consecutive samples over a ceiling before it counts; default 3
//! max_rss_ratio = 1.5        # regression gate: RSS over 1.5x the previous release's steady state on the host
//! max_cpu_ratio = 2.0        # regression gate: CPU % over 2x the previous release's steady state
//!
//! [targets]                  # required; at least one of:
//! hosts = ["web-1"]          # host names as agents register them
//! labels = { role = "web" }  # every label must match; the union with `hosts` is targeted
//!
//! [strategy]                 # optional; at most one of batch_size / batch_percent / canary
//! batch_size = 2             # hosts per batch (default 1)
//! # batch_percent = 25       # share of the targets per batch, rounded up, at least 1 host
//! # canary = [1, "10%", "50%", "100%"]  # cumulative stages; increasing, ending at "100%"
//! pause_after_canary = false # wait for `rollout promote` after each canary stage but the last
//! max_unavailable = 1        # or "25%": hosts updating at once; splits batches (default 1)
//! max_failures = 0           # or "10%" (rounded down): failures tolerated before halting (default 0)
//! max_host_rollbacks = 1     # or "20%": hosts that rolled themselves back before halting (default: off)
//! auto_rollback = true       # past the budget, roll back every updated host (default true)
//! min_healthy_time = "10s"   # healthy continuously this long to pass a batch (default 10s)
//! healthy_deadline = "5m"    # ... within this long after start (default 5m); an exec process
//!                            # that exits twice, or exits and is not restarted, fails sooner
//! commit_deadline = "10m"    # a host not committed within this rolls itself back (default 10m)
//! progress_deadline = "1h"   # the whole rollout (default 1h)
//! stage_parallelism = 16     # hosts pre-fetching the artifact at once (default 16)
//! rollback_parallelism = 10  # hosts rolling back at once (default 10)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rollout_proto::pb;
use serde::{Deserialize, Serialize, de};
use sha2::{Digest as _, Sha256};

/// Timeout of a hook that does not name one (the agent's default too).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Grace between SIGTERM and SIGKILL of an exec service.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between health probes.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// A health probe taking longer fails.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive probe failures before a check is failing.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Consecutive probe successes before a check is passing.
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;
/// Consecutive samples over a resource ceiling before it counts.
pub const DEFAULT_SUSTAINED_SAMPLES: u32 = 3;
/// Default `strategy.min_healthy_time`.
pub const DEFAULT_MIN_HEALTHY_TIME: Duration = Duration::from_secs(10);
/// Default `strategy.healthy_deadline`.
pub const DEFAULT_HEALTHY_DEADLINE: Duration = Duration::from_secs(5 * 60);
/// Default `strategy.commit_deadline`.
pub const DEFAULT_COMMIT_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// Default `strategy.progress_deadline`.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(60 * 60);
/// Default `strategy.stage_parallelism`.
pub const DEFAULT_STAGE_PARALLELISM: usize = 16;
/// Default `strategy.rollback_parallelism`.
pub const DEFAULT_ROLLBACK_PARALLELISM: usize = 10;

/// A release spec that cannot be used. Every message names the file and the key
/// at fault and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec file could not be read.
    #[error("cannot read release spec {path}: {source}")]
    Read {
        /// The spec file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Not TOML, an unknown key, a missing key or a value of the wrong type;
    /// toml's message quotes the line and names the key.
    #[error("{file}: {source}")]
    Parse {
        /// The spec file (or `release spec` when parsed from text).
        file: String,
        /// toml's error, with line, column and key.
        source: toml::de::Error,
    },
    /// A well-formed value that makes no sense.
    #[error("{file}: `{key}`: {reason}")]
    Invalid {
        /// The spec file (or `release spec` when parsed from text).
        file: String,
        /// Dotted key at fault, e.g. `strategy.canary`.
        key: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The artifact named by `artifact.path` cannot be read.
    #[error(
        "artifact {path} cannot be read: {source}; check `artifact.path` (relative to the spec file's directory)"
    )]
    ArtifactUnreadable {
        /// The resolved artifact path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The artifact does not match `artifact.digest`.
    #[error(
        "artifact {path} has digest {actual} but `artifact.digest` says {expected}; rebuild the artifact or update the digest"
    )]
    DigestMismatch {
        /// The resolved artifact path.
        path: PathBuf,
        /// The digest the spec names.
        expected: String,
        /// The digest of the file.
        actual: String,
    },
}

/// A validated release spec, ready to plan and deploy.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploySpec {
    /// Service name; a directory name on every host.
    pub service: String,
    /// Release id; a directory name on every host.
    pub release: String,
    /// The artifact to upload before the rollout starts.
    pub artifact: ArtifactSpec,
    /// How the release runs on a host, as sent to agents. `artifact` is `None`:
    /// the caller fills it (see [`ArtifactDigest::to_pb`]) after uploading, so a
    /// definition that skipped the upload is refused by agents.
    pub definition: pb::ServiceDefinition,
    /// Which hosts the rollout updates.
    pub targets: Targets,
    /// How the rollout proceeds across those hosts.
    pub strategy: Strategy,
}

/// The artifact a spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactSpec {
    /// Resolved against the spec file's directory, so the CLI can run anywhere.
    pub path: PathBuf,
    /// `sha256:<64 lowercase hex>` when the operator pinned the content.
    pub digest: Option<String>,
    /// Base64 ed25519 signature over the digest string (`rollout release sign`);
    /// required by agents configured with `trusted_keys`.
    pub signature: Option<String>,
}

/// Which hosts a rollout targets: the union of named hosts and label matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    /// Hosts named explicitly; each must be registered.
    pub hosts: Vec<String>,
    /// Hosts whose labels include all of these.
    pub labels: BTreeMap<String, String>,
}

/// A number of hosts, absolute or as a share of the targeted hosts.
///
/// Written `2` or `"25%"`; persisted the same way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Count {
    /// This many hosts.
    Absolute(u32),
    /// This percentage (0-100) of the targeted hosts.
    Percent(f64),
}

/// Absorbs float noise such as `0.1 * 30 = 3.0000000000000004` before rounding.
const ROUNDING_SLACK: f64 = 1e-9;

impl Count {
    /// Hosts out of `n` this count names, a percentage rounded *up* (10% of 3
    /// hosts is 1 host, not 0), capped at `n`.
    pub fn resolve(&self, n: usize) -> usize {
        match *self {
            Count::Absolute(k) => usize::try_from(k).unwrap_or(usize::MAX).min(n),
            Count::Percent(p) => {
                ((n as f64 * p / 100.0 - ROUNDING_SLACK).ceil().max(0.0) as usize).min(n)
            }
        }
    }

    /// Like [`Count::resolve`] but a percentage rounds *down*: what a budget
    /// tolerates (10% of 5 hosts tolerates 0 failures).
    pub fn resolve_floor(&self, n: usize) -> usize {
        match *self {
            Count::Absolute(k) => usize::try_from(k).unwrap_or(usize::MAX).min(n),
            Count::Percent(p) => {
                ((n as f64 * p / 100.0 + ROUNDING_SLACK).floor().max(0.0) as usize).min(n)
            }
        }
    }

    fn is_zero(&self) -> bool {
        match *self {
            Count::Absolute(k) => k == 0,
            Count::Percent(p) => p == 0.0,
        }
    }
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Count::Absolute(k) => write!(f, "{k}"),
            Count::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for Count {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Some(num) = t.strip_suffix('%') {
            let p: f64 = num
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a percentage; write it like \"25%\""))?;
            if !p.is_finite() || !(0.0..=100.0).contains(&p) {
                return Err(format!("{s:?} must be between 0% and 100%"));
            }
            Ok(Count::Percent(p))
        } else {
            t.parse::<u32>().map(Count::Absolute).map_err(|_| {
                format!("{s:?} is neither a host count like 2 nor a percentage like \"25%\"")
            })
        }
    }
}

impl Serialize for Count {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Count::Absolute(k) => s.serialize_u32(*k),
            Count::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a host count like 2 or a percentage like \"25%\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                u32::try_from(v)
                    .map(Count::Absolute)
                    .map_err(|_| E::custom(format!("{v} is too many hosts")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "{v} is negative; write a host count like 2 or a percentage like \"25%\""
                    ))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                Err(E::custom(format!(
                    "{v} is not a whole host count; write a percentage as a string like \"25%\""
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Count, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// How the targeted hosts are cut into batches (before `max_unavailable`
/// splits them further).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchPlan {
    /// Fixed batches of this many hosts (at least 1).
    Size(u32),
    /// Batches of this share of the hosts, rounded up, at least 1 host.
    Percent(f64),
    /// Cumulative stages: stage k brings the updated total up to its count; the
    /// last is 100%.
    Canary(Vec<Count>),
}

/// How a rollout proceeds across its hosts; persisted with the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    /// How hosts are cut into batches.
    pub batches: BatchPlan,
    /// Wait for `rollout promote` after each canary stage except the last.
    pub pause_after_canary: bool,
    /// Hosts updating at once across the fleet (at least 1); caps batch size.
    pub max_unavailable: Count,
    /// Failures tolerated before the rollout halts.
    pub max_failures: Count,
    /// Hosts that roll the release back on their own (unhealthy, hook or
    /// resource gate failures) tolerated before the rollout halts; `None`: only
    /// `max_failures` applies.
    #[serde(default)]
    pub max_host_rollbacks: Option<Count>,
    /// Past the budget, roll back every host this rollout changed.
    pub auto_rollback: bool,
    /// The whole rollout fails when it has not finished within this long.
    #[serde(with = "humantime_serde")]
    pub progress_deadline: Duration,
    /// Hosts pre-fetching the artifact at once.
    pub stage_parallelism: usize,
    /// Hosts rolling back at once; rollback is urgent, so usually wider than a batch.
    pub rollback_parallelism: usize,
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy {
            batches: BatchPlan::Size(1),
            pause_after_canary: false,
            max_unavailable: Count::Absolute(1),
            max_failures: Count::Absolute(0),
            max_host_rollbacks: None,
            auto_rollback: true,
            progress_deadline: DEFAULT_PROGRESS_DEADLINE,
            stage_parallelism: DEFAULT_STAGE_PARALLELISM,
            rollback_parallelism: DEFAULT_ROLLBACK_PARALLELISM,
        }
    }
}

/// The content digest and size of an artifact file, as agents receive them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactDigest {
    /// `sha256:<64 lowercase hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

impl ArtifactDigest {
    /// The wire artifact for [`DeploySpec::definition`].
    pub fn to_pb(&self) -> pb::Artifact {
        pb::Artifact {
            digest: self.digest.clone(),
            size: self.size,
            signature: String::new(),
        }
    }
}

/// Hashes the artifact at `path` (streaming, never loading it whole) and, when
/// `expected` is given, checks it matches.
pub fn verify_artifact(path: &Path, expected: Option<&str>) -> Result<ArtifactDigest, SpecError> {
    let unreadable = |source| SpecError::ArtifactUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(unreadable)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(unreadable(e)),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if let Some(expected) = expected
        && !expected.eq_ignore_ascii_case(&actual)
    {
        return Err(SpecError::DigestMismatch {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(ArtifactDigest {
        digest: actual,
        size,
    })
}

/// Reads and validates the spec at `path`; a relative `artifact.path` is
/// resolved against the file's directory.
pub fn load_spec(path: impl AsRef<Path>) -> Result<DeploySpec, SpecError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    parse_named(&text, dir, &path.display().to_string())
}

/// Parses and validates spec text; a relative `artifact.path` is resolved
/// against `spec_dir`.
pub fn parse_spec(text: &str, spec_dir: &Path) -> Result<DeploySpec, SpecError> {
    parse_named(text, spec_dir, "release spec")
}

fn parse_named(text: &str, spec_dir: &Path, file: &str) -> Result<DeploySpec, SpecError> {
    let raw: RawSpec = toml::from_str(text).map_err(|source| SpecError::Parse {
        file: file.to_string(),
        source,
    })?;
    raw.validate(spec_dir)
        .map_err(|Bad { key, reason }| SpecError::Invalid {
            file: file.to_string(),
            key,
            reason,
        })
}

/// A validation failure before the file name is attached.
struct Bad {
    key: String,
    reason: String,
}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> Bad {
    Bad {
        key: key.into(),
        reason: reason.into(),
    }
}

// ---- the file as written -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    service: String,
    release: String,
    artifact: RawArtifact,
    run: RawRun,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    health: Vec<RawHealth>,
    #[serde(default)]
    thresholds: RawThresholds,
    targets: RawTargets,
    #[serde(default)]
    strategy: RawStrategy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArtifact {
    path: String,
    digest: Option<String>,
    signature: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    exec: Option<Vec<String>>,
    restart: Option<RawRestart>,
    #[serde(default, deserialize_with = "opt_duration")]
    stop_timeout: Option<Duration>,
    systemd_unit: Option<String>,
    start: Option<RawCommand>,
    stop: Option<RawCommand>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawRestart {
    Always,
    OnFailure,
    Never,
}

/// A command written either `[argv]` or `{ command = [argv], timeout = "30s" }`.
#[derive(Debug)]
struct RawCommand {
    command: Vec<String>,
    timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommandTable {
    command: Vec<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    timeout: Option<Duration>,
}

impl<'de> Deserialize<'de> for RawCommand {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawCommand;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an argv array or a table { command = [argv], timeout = \"30s\" }")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<RawCommand, A::Error> {
                let command =
                    Vec::<String>::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(RawCommand {
                    command,
                    timeout: None,
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawCommand, A::Error> {
                let t = RawCommandTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawCommand {
                    command: t.command,
                    timeout: t.timeout,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    before_stop: Option<RawCommand>,
    before_switch: Option<RawCommand>,
    after_switch: Option<RawCommand>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    name: Option<String>,
    http: Option<String>,
    tcp: Option<String>,
    exec: Option<Vec<String>>,
    expect_status: Option<u32>,
    body_contains: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    interval: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    timeout: Option<Duration>,
    failure_threshold: Option<u32>,
    success_threshold: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThresholds {
    max_rss: Option<ByteSize>,
    max_cpu_percent: Option<f64>,
    sustained_samples: Option<u32>,
    max_rss_ratio: Option<f64>,
    max_cpu_ratio: Option<f64>,
}

/// Bytes, written as an integer or a string like `"512MiB"`.
#[derive(Debug, Clone, Copy)]
struct ByteSize(u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "ki" | "kib" => 1 << 10,
            "mi" | "mib" => 1 << 20,
            "gi" | "gib" => 1 << 30,
            "ti" | "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "{s:?} has an unknown unit; write bytes like \"512MiB\", \"2GB\" or an integer"
                ));
            }
        };
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size; write it like \"512MiB\""))?;
        let bytes = (n * mult as f64).round();
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("{s:?} is too large"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"512MiB\" or an integer number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| {
                    E::custom(format!("{v} is negative; write a size like \"512MiB\""))
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargets {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStrategy {
    batch_size: Option<u32>,
    batch_percent: Option<f64>,
    canary: Option<Vec<Count>>,
    pause_after_canary: Option<bool>,
    max_unavailable: Option<Count>,
    max_failures: Option<Count>,
    max_host_rollbacks: Option<Count>,
    auto_rollback: Option<bool>,
    #[serde(default, deserialize_with = "opt_duration")]
    min_healthy_time: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    healthy_deadline: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    commit_deadline: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    progress_deadline: Option<Duration>,
    stage_parallelism: Option<u32>,
    rollback_parallelism: Option<u32>,
}

/// A duration written like `"10s"`, with an error that shows how to write one.
fn opt_duration<'de, D: de::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map(Some).map_err(|e| {
        de::Error::custom(format!(
            "{text:?} is not a duration ({e}); write it like \"10s\", \"5m\" or \"1h 30m\""
        ))
    })
}

// ---- validation ------------------------------------------------------------

/// Same rule as the agent's `release::validate_name` (a directory name on
/// hosts), copied so the coordinator refuses a bad name before any host sees it.
fn validate_name(key: &str, name: &str) -> Result<(), Bad> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(bad(
            key,
            format!(
                "{name:?} must be 1-128 characters of A-Z a-z 0-9 . _ - and not start with '.' (no '/', no '..')"
            ),
        ))
    }
}

/// Milliseconds for the wire; `Ok(None)` lets the caller default.
fn millis(key: &str, d: Duration, zero_ok: bool) -> Result<u64, Bad> {
    if d.is_zero() {
        if zero_ok {
            return Ok(0);
        }
        return Err(bad(key, "must be longer than zero, e.g. \"10s\""));
    }
    if d < Duration::from_millis(1) {
        return Err(bad(
            key,
            format!("{d:?} is below the 1ms resolution; use at least \"1ms\""),
        ));
    }
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn argv(key: &str, argv: Vec<String>) -> Result<Vec<String>, Bad> {
    match argv.first() {
        None => Err(bad(
            key,
            "is empty; name the program to run, e.g. [\"./bin/web\"]",
        )),
        Some(p) if p.is_empty() => Err(bad(key, "the program (first element) is empty")),
        Some(_) => Ok(argv),
    }
}

fn command(key: &str, c: RawCommand) -> Result<pb::Command, Bad> {
    Ok(pb::Command {
        argv: argv(key, c.command)?,
        timeout_ms: millis(
            &format!("{key}.timeout"),
            c.timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT),
            false,
        )?,
    })
}

fn opt_command(key: &str, c: Option<RawCommand>) -> Result<Option<pb::Command>, Bad> {
    c.map(|c| command(key, c)).transpose()
}

fn validate_count(key: &str, c: Count, zero_ok: bool) -> Result<Count, Bad> {
    if !zero_ok && c.is_zero() {
        return Err(bad(
            key,
            format!("{c} would never update a host; use at least 1 or \"1%\""),
        ));
    }
    Ok(c)
}

impl RawSpec {
    fn validate(self, spec_dir: &Path) -> Result<DeploySpec, Bad> {
        validate_name("service", &self.service)?;
        validate_name("release", &self.release)?;

        let artifact = self.artifact.validate(spec_dir)?;
        let supervision = self.run.validate()?;

        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(bad(
                    format!("env.{k}"),
                    "an environment variable name must be non-empty without '=' or NUL",
                ));
            }
            if v.contains('\0') {
                return Err(bad(format!("env.{k}"), "the value contains a NUL byte"));
            }
        }

        let hooks = pb::Hooks {
            before_stop: opt_command("hooks.before_stop", self.hooks.before_stop)?,
            before_switch: opt_command("hooks.before_switch", self.hooks.before_switch)?,
            after_switch: opt_command("hooks.after_switch", self.hooks.after_switch)?,
        };

        let mut names = BTreeSet::new();
        let mut health_checks = Vec::with_capacity(self.health.len());
        for (i, h) in self.health.into_iter().enumerate() {
            let check = h.validate(i)?;
            if !names.insert(check.name.clone()) {
                return Err(bad(
                    format!("health[{i}].name"),
                    format!(
                        "{:?} is used by an earlier check; give each check its own name",
                        check.name
                    ),
                ));
            }
            health_checks.push(check);
        }

        let thresholds = self.thresholds.validate()?;
        // Ceilings need the service's process, which the agent has only when
        // it runs it: under systemd or scripts they would never be checked.
        let ceilings = [
            ("max_rss", thresholds.max_rss_bytes > 0),
            ("max_cpu_percent", thresholds.max_cpu_percent > 0.0),
            ("max_rss_ratio", thresholds.max_rss_ratio > 0.0),
            ("max_cpu_ratio", thresholds.max_cpu_ratio > 0.0),
        ];
        if let Some((key, _)) = ceilings.iter().find(|(_, set)| *set)
            && !matches!(supervision, pb::service_definition::Supervision::Exec(_))
        {
            let mode = match supervision {
                pb::service_definition::Supervision::Systemd(_) => "run.systemd_unit",
                _ => "run.start (scripts)",
            };
            return Err(bad(
                format!("thresholds.{key}"),
                format!(
                    "resource ceilings are checked on the process the agent runs (run.exec); with {mode} the agent does not know the service's process, so the ceiling would never be checked; run the service with run.exec or remove [thresholds]"
                ),
            ));
        }
        let targets = self.targets.validate()?;
        let (strategy, times) = self.strategy.validate()?;

        let definition = pb::ServiceDefinition {
            service: self.service.clone(),
            release: self.release.clone(),
            artifact: None,
            env: self.env.into_iter().collect(),
            hooks: Some(hooks),
            health_checks,
            thresholds: Some(thresholds),
            min_healthy_time_ms: times.min_healthy_time_ms,
            healthy_deadline_ms: times.healthy_deadline_ms,
            commit_deadline_ms: times.commit_deadline_ms,
            supervision: Some(supervision),
        };
        Ok(DeploySpec {
            service: self.service,
            release: self.release,
            artifact,
            definition,
            targets,
            strategy,
        })
    }
}

impl RawArtifact {
    fn validate(self, spec_dir: &Path) -> Result<ArtifactSpec, Bad> {
        if self.path.trim().is_empty() {
            return Err(bad(
                "artifact.path",
                "is empty; name the artifact file, e.g. \"web-v2.tar.gz\"",
            ));
        }
        let digest = match self.digest {
            None => None,
            Some(d) => {
                let hex_part = d.strip_prefix("sha256:").unwrap_or("");
                if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(
                        "artifact.digest",
                        format!(
                            "{d:?} must look like sha256:<64 hex digits> (e.g. from `sha256sum`), or be omitted"
                        ),
                    ));
                }
                Some(format!("sha256:{}", hex_part.to_ascii_lowercase()))
            }
        };
        Ok(ArtifactSpec {
            path: spec_dir.join(&self.path),
            digest,
            signature: self.signature.filter(|s| !s.trim().is_empty()),
        })
    }
}

impl RawRun {
    fn validate(self) -> Result<pb::service_definition::Supervision, Bad> {
        use pb::service_definition::Supervision;
        let hooks_mode = self.start.is_some() || self.stop.is_some();
        let modes = [self.exec.is_some(), self.systemd_unit.is_some(), hooks_mode]
            .iter()
            .filter(|m| **m)
            .count();
        if modes != 1 {
            return Err(bad(
                "run",
                if modes == 0 {
                    "names no way to run the service; set exactly one of exec = [argv], systemd_unit = \"x.service\", or start = [argv] (with optional stop)"
                } else {
                    "names several ways to run the service; keep exactly one of exec, systemd_unit, or start/stop"
                },
            ));
        }
        if self.exec.is_none() {
            if self.restart.is_some() {
                return Err(bad("run.restart", "applies only to run.exec; remove it"));
            }
            if self.stop_timeout.is_some() {
                return Err(bad(
                    "run.stop_timeout",
                    "applies only to run.exec; remove it",
                ));
            }
        }
        if let Some(exec) = self.exec {
            let restart = match self.restart.unwrap_or(RawRestart::OnFailure) {
                RawRestart::Always => pb::RestartPolicy::Always,
                RawRestart::OnFailure => pb::RestartPolicy::OnFailure,
                RawRestart::Never => pb::RestartPolicy::Never,
            };
            return Ok(Supervision::Exec(pb::ExecSupervision {
                argv: argv("run.exec", exec)?,
                restart: restart as i32,
                stop_timeout_ms: millis(
                    "run.stop_timeout",
                    self.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT),
                    false,
                )?,
            }));
        }
        if let Some(unit) = self.systemd_unit {
            if unit.is_empty() || unit.contains('/') || unit.contains(char::is_whitespace) {
                return Err(bad(
                    "run.systemd_unit",
                    format!("{unit:?} must name a unit, e.g. \"web.service\""),
                ));
            }
            return Ok(Supervision::Systemd(pb::SystemdSupervision { unit }));
        }
        let Some(start) = self.start else {
            return Err(bad(
                "run.start",
                "is missing; hooks mode needs a start command (stop alone cannot run the service)",
            ));
        };
        Ok(Supervision::HooksOnly(pb::HooksSupervision {
            start: Some(command("run.start", start)?),
            stop: opt_command("run.stop", self.stop)?,
        }))
    }
}

impl RawHealth {
    fn validate(self, i: usize) -> Result<pb::HealthCheck, Bad> {
        use pb::health_check::Kind;
        let key = format!("health[{i}]");
        let kinds = [self.http.is_some(), self.tcp.is_some(), self.exec.is_some()]
            .iter()
            .filter(|k| **k)
            .count();
        if kinds != 1 {
            return Err(bad(
                &key,
                "set exactly one of http = \"http://...\", tcp = \"host:port\", exec = [argv]",
            ));
        }
        if self.http.is_none() && (self.expect_status.is_some() || self.body_contains.is_some()) {
            return Err(bad(
                format!("{key}.expect_status"),
                "expect_status and body_contains apply only to http checks; remove them",
            ));
        }
        let name = match self.name {
            None => format!("check-{i}"),
            Some(n) if n.trim().is_empty() => {
                return Err(bad(
                    format!("{key}.name"),
                    "is empty; name the check or omit the key",
                ));
            }
            Some(n) => n,
        };
        let timeout = self.timeout.unwrap_or(DEFAULT_CHECK_TIMEOUT);
        let timeout_ms = millis(&format!("{key}.timeout"), timeout, false)?;
        let kind = if let Some(url) = self.http {
            let rest = url.strip_prefix("http://").unwrap_or("");
            if rest.is_empty() || rest.starts_with('/') {
                return Err(bad(
                    format!("{key}.http"),
                    format!(
                        "{url:?} must be an http:// URL with a host, e.g. \"http://127.0.0.1:8080/health\""
                    ),
                ));
            }
            let expect_status = match self.expect_status {
                None => 0,
                Some(s @ 100..=599) => s,
                Some(s) => {
                    return Err(bad(
                        format!("{key}.expect_status"),
                        format!("{s} is not an HTTP status (100-599); omit it to accept any 2xx"),
                    ));
                }
            };
            Kind::Http(pb::HttpCheck {
                url,
                expect_status,
                body_contains: self.body_contains.unwrap_or_default(),
            })
        } else if let Some(address) = self.tcp {
            // A `${NAME}` port is expanded by each agent from its host [env].
            let port_ok = address.rsplit_once(':').is_some_and(|(h, p)| {
                !h.is_empty()
                    && (p.parse::<u16>().is_ok_and(|p| p != 0)
                        || (p.starts_with("${") && p.ends_with('}') && p.len() > 3))
            });
            if !port_ok {
                return Err(bad(
                    format!("{key}.tcp"),
                    format!("{address:?} must be host:port, e.g. \"127.0.0.1:8080\""),
                ));
            }
            Kind::Tcp(pb::TcpCheck { address })
        } else {
            let exec = self.exec.unwrap_or_default();
            Kind::Exec(pb::Command {
                argv: argv(&format!("{key}.exec"), exec)?,
                timeout_ms,
            })
        };
        let threshold = |k: &str, v: Option<u32>, default: u32| match v {
            Some(0) => Err(bad(format!("{key}.{k}"), "must be at least 1")),
            v => Ok(v.unwrap_or(default)),
        };
        Ok(pb::HealthCheck {
            name,
            interval_ms: millis(
                &format!("{key}.interval"),
                self.interval.unwrap_or(DEFAULT_CHECK_INTERVAL),
                false,
            )?,
            timeout_ms,
            failure_threshold: threshold(
                "failure_threshold",
                self.failure_threshold,
                DEFAULT_FAILURE_THRESHOLD,
            )?,
            success_threshold: threshold(
                "success_threshold",
                self.success_threshold,
                DEFAULT_SUCCESS_THRESHOLD,
            )?,
            kind: Some(kind),
        })
    }
}

impl RawThresholds {
    fn validate(self) -> Result<pb::Thresholds, Bad> {
        let max_rss_bytes = match self.max_rss {
            None => 0,
            Some(ByteSize(0)) => {
                return Err(bad(
                    "thresholds.max_rss",
                    "0 bytes would fail every release; omit the key for no ceiling",
                ));
            }
            Some(ByteSize(b)) => b,
        };
        let max_cpu_percent = match self.max_cpu_percent {
            None => 0.0,
            Some(p) if p.is_finite() && p > 0.0 => p,
            Some(p) => {
                return Err(bad(
                    "thresholds.max_cpu_percent",
                    format!(
                        "{p} must be a positive percentage of one core, e.g. 80.0; omit the key for no ceiling"
                    ),
                ));
            }
        };
        let sustained_samples = match self.sustained_samples {
            None => DEFAULT_SUSTAINED_SAMPLES,
            Some(0) => return Err(bad("thresholds.sustained_samples", "must be at least 1")),
            Some(n) => n,
        };
        let ratio = |key: &'static str, v: Option<f64>| -> Result<f64, Bad> {
            match v {
                None => Ok(0.0),
                Some(r) if r.is_finite() && r >= 1.0 => Ok(r),
                Some(r) => Err(bad(
                    key,
                    format!(
                        "{r} must be a multiple of at least 1.0 of the previous release's steady state, e.g. 1.5"
                    ),
                )),
            }
        };
        Ok(pb::Thresholds {
            max_rss_bytes,
            max_cpu_percent,
            sustained_samples,
            max_rss_ratio: ratio("thresholds.max_rss_ratio", self.max_rss_ratio)?,
            max_cpu_ratio: ratio("thresholds.max_cpu_ratio", self.max_cpu_ratio)?,
        })
    }
}

impl RawTargets {
    fn validate(self) -> Result<Targets, Bad> {
        if self.hosts.is_empty() && self.labels.is_empty() {
            return Err(bad(
                "targets",
                "names no hosts; set targets.hosts = [\"web-1\"] and/or targets.labels = { role = \"web\" }",
            ));
        }
        if let Some(i) = self.hosts.iter().position(|h| h.trim().is_empty()) {
            return Err(bad(
                format!("targets.hosts[{i}]"),
                "is empty; write a host name as `rollout hosts` lists it",
            ));
        }
        if self.labels.keys().any(|k| k.is_empty()) {
            return Err(bad("targets.labels", "has an empty label name"));
        }
        Ok(Targets {
            hosts: self.hosts,
            labels: self.labels,
        })
    }
}

/// Per-host timing that travels in the service definition.
struct HostTimes {
    min_healthy_time_ms: u64,
    healthy_deadline_ms: u64,
    commit_deadline_ms: u64,
}

impl RawStrategy {
    fn validate(self) -> Result<(Strategy, HostTimes), Bad> {
        let given = [
            self.batch_size.is_some(),
            self.batch_percent.is_some(),
            self.canary.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given > 1 {
            return Err(bad(
                "strategy",
                "sets more than one of batch_size, batch_percent, canary; keep one",
            ));
        }
        let batches = if let Some(n) = self.batch_size {
            if n == 0 {
                return Err(bad(
                    "strategy.batch_size",
                    "0 would never update a host; use at least 1",
                ));
            }
            BatchPlan::Size(n)
        } else if let Some(p) = self.batch_percent {
            if !p.is_finite() || p <= 0.0 || p > 100.0 {
                return Err(bad(
                    "strategy.batch_percent",
                    format!("{p} must be a percentage above 0 and at most 100, e.g. 25"),
                ));
            }
            BatchPlan::Percent(p)
        } else if let Some(stages) = self.canary {
            validate_canary(&stages)?;
            BatchPlan::Canary(stages)
        } else {
            BatchPlan::Size(1)
        };
        let pause_after_canary = self.pause_after_canary.unwrap_or(false);
        if pause_after_canary && !matches!(batches, BatchPlan::Canary(_)) {
            return Err(bad(
                "strategy.pause_after_canary",
                "has no canary stages to pause after; add strategy.canary or remove it",
            ));
        }
        let max_unavailable = validate_count(
            "strategy.max_unavailable",
            self.max_unavailable.unwrap_or(Count::Absolute(1)),
            false,
        )?;
        let max_failures = self.max_failures.unwrap_or(Count::Absolute(0));

        let min_healthy_time = self.min_healthy_time.unwrap_or(DEFAULT_MIN_HEALTHY_TIME);
        let healthy_deadline = self.healthy_deadline.unwrap_or(DEFAULT_HEALTHY_DEADLINE);
        let commit_deadline = self.commit_deadline.unwrap_or(DEFAULT_COMMIT_DEADLINE);
        let progress_deadline = self.progress_deadline.unwrap_or(DEFAULT_PROGRESS_DEADLINE);
        let times = HostTimes {
            min_healthy_time_ms: millis("strategy.min_healthy_time", min_healthy_time, true)?,
            healthy_deadline_ms: millis("strategy.healthy_deadline", healthy_deadline, false)?,
            commit_deadline_ms: millis("strategy.commit_deadline", commit_deadline, false)?,
        };
        millis("strategy.progress_deadline", progress_deadline, false)?;
        if healthy_deadline <= min_healthy_time {
            return Err(bad(
                "strategy.healthy_deadline",
                format!(
                    "{} can never be met: hosts must stay healthy for min_healthy_time = {} first; make it longer",
                    humantime::format_duration(healthy_deadline),
                    humantime::format_duration(min_healthy_time),
                ),
            ));
        }
        if progress_deadline < healthy_deadline {
            return Err(bad(
                "strategy.progress_deadline",
                format!(
                    "{} is shorter than one batch's healthy_deadline = {}; make it longer",
                    humantime::format_duration(progress_deadline),
                    humantime::format_duration(healthy_deadline),
                ),
            ));
        }
        let parallelism = |k: &str, v: Option<u32>, default: usize| match v {
            None => Ok(default),
            Some(0) => Err(bad(format!("strategy.{k}"), "must be at least 1")),
            Some(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let strategy = Strategy {
            batches,
            pause_after_canary,
            max_unavailable,
            max_failures,
            max_host_rollbacks: self.max_host_rollbacks,
            auto_rollback: self.auto_rollback.unwrap_or(true),
            progress_deadline,
            stage_parallelism: parallelism(
                "stage_parallelism",
                self.stage_parallelism,
                DEFAULT_STAGE_PARALLELISM,
            )?,
            rollback_parallelism: parallelism(
                "rollback_parallelism",
                self.rollback_parallelism,
                DEFAULT_ROLLBACK_PARALLELISM,
            )?,
        };
        Ok((strategy, times))
    }
}

/// Canary stages are cumulative: counts first, then percentages, each kind
/// strictly increasing, ending at `"100%"`. (A count and a percentage cannot be
/// compared without the fleet size; the planner skips a stage that adds nobody.)
fn validate_canary(stages: &[Count]) -> Result<(), Bad> {
    const KEY: &str = "strategy.canary";
    if stages.last() != Some(&Count::Percent(100.0)) {
        return Err(bad(
            KEY,
            "must end at \"100%\" so every host is updated, e.g. [1, \"10%\", \"50%\", \"100%\"]",
        ));
    }
    let mut last_abs: Option<u32> = None;
    let mut last_pct: Option<f64> = None;
    for (i, stage) in stages.iter().enumerate() {
        validate_count(&format!("{KEY}[{i}]"), *stage, false)?;
        match *stage {
            Count::Absolute(k) => {
                if last_pct.is_some() {
                    return Err(bad(
                        format!("{KEY}[{i}]"),
                        "a host count after a percentage; list counts first, e.g. [1, 3, \"50%\", \"100%\"]",
                    ));
                }
                if last_abs.is_some_and(|prev| k <= prev) {
                    return Err(bad(
                        format!("{KEY}[{i}]"),
                        format!(
                            "{k} does not increase; stages are cumulative totals, each larger than the last"
                        ),
                    ));
                }
                last_abs = Some(k);
            }
            Count::Percent(p) => {
                if last_pct.is_some_and(|prev| p <= prev) {
                    return Err(bad(
                        format!("{KEY}[{i}]"),
                        format!(
                            "{p}% does not increase; stages are cumulative totals, each larger than the last"
                        ),
                    ));
                }
                last_pct = Some(p);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
service = "web"
release = "v2"

[artifact]
path = "web-v2.tar.gz"
digest = "sha256:AB00000000000000000000000000000000000000000000000000000000000000"

[run]
exec = ["./bin/web", "--port", "8080"]
restart = "always"
stop_timeout = "15s"

[env]
PORT = "8080"

[hooks]
before_stop = { command = ["./hooks/drain.sh"], timeout = "30s" }
before_switch = ["./hooks/migrate.sh"]

[[health]]
name = "http"
http = "http://127.0.0.1:8080/health"
expect_status = 200
body_contains = "ok"
interval = "2s"
timeout = "1s"
failure_threshold = 3
success_threshold = 1

[[health]]
tcp = "127.0.0.1:8080"

[[health]]
name = "script"
exec = ["./bin/check"]

[thresholds]
max_rss = "512MiB"
max_cpu_percent = 80.0
sustained_samples = 4

[targets]
hosts = ["web-1"]
labels = { role = "web" }

[strategy]
canary = [1, "10%", "50%", "100%"]
pause_after_canary = true
max_unavailable = "25%"
max_failures = "10%"
auto_rollback = false
min_healthy_time = "10s"
healthy_deadline = "5m"
commit_deadline = "10m"
progress_deadline = "1h"
stage_parallelism = 8
rollback_parallelism = 20
"#;

    const MINIMAL: &str = r#"
service = "web"
release = "v2"
[artifact]
path = "web.tar.gz"
[run]
exec = ["./bin/web"]
[targets]
hosts = ["web-1"]
"#;

    fn parse(text: &str) -> Result<DeploySpec, SpecError> {
        parse_spec(text, Path::new("/specs"))
    }

    /// Parses `text` expecting an error whose message contains every needle.
    #[track_caller]
    fn rejects(text: &str, needles: &[&str]) {
        let err = match parse(text) {
            Ok(spec) => panic!("accepted, expected an error mentioning {needles:?}: {spec:?}"),
            Err(e) => e.to_string(),
        };
        for n in needles {
            assert!(err.contains(n), "error {err:?} does not mention {n:?}");
        }
    }

    /// MINIMAL with `line` inserted into `[section]` (created when absent).
    fn minimal_with(section: &str, line: &str) -> String {
        let header = format!("[{section}]\n");
        if MINIMAL.contains(&header) {
            MINIMAL.replacen(&header, &format!("{header}{line}\n"), 1)
        } else {
            format!("{MINIMAL}{header}{line}\n")
        }
    }

    #[test]
    fn full_example_parses_into_definition_targets_and_strategy() {
        let spec = parse(FULL).expect("full example parses");
        assert_eq!(spec.service, "web");
        assert_eq!(spec.release, "v2");
        assert_eq!(spec.artifact.path, Path::new("/specs/web-v2.tar.gz"));
        assert_eq!(
            spec.artifact.digest.as_deref(),
            Some("sha256:ab00000000000000000000000000000000000000000000000000000000000000")
        );
        let d = &spec.definition;
        assert_eq!((d.service.as_str(), d.release.as_str()), ("web", "v2"));
        assert!(
            d.artifact.is_none(),
            "the caller fills the artifact after upload"
        );
        match &d.supervision {
            Some(pb::service_definition::Supervision::Exec(e)) => {
                assert_eq!(e.argv, ["./bin/web", "--port", "8080"]);
                assert_eq!(e.restart, pb::RestartPolicy::Always as i32);
                assert_eq!(e.stop_timeout_ms, 15_000);
            }
            other => panic!("expected exec supervision, got {other:?}"),
        }
        assert_eq!(d.env.get("PORT").map(String::as_str), Some("8080"));
        let hooks = d.hooks.as_ref().expect("hooks");
        assert_eq!(
            hooks.before_stop,
            Some(pb::Command {
                argv: vec!["./hooks/drain.sh".into()],
                timeout_ms: 30_000
            })
        );
        assert_eq!(
            hooks.before_switch.as_ref().map(|c| c.timeout_ms),
            Some(60_000)
        );
        assert_eq!(hooks.after_switch, None);
        assert_eq!(d.health_checks.len(), 3);
        let http = &d.health_checks[0];
        assert_eq!((http.interval_ms, http.timeout_ms), (2_000, 1_000));
        assert_eq!((http.failure_threshold, http.success_threshold), (3, 1));
        assert_eq!(
            http.kind,
            Some(pb::health_check::Kind::Http(pb::HttpCheck {
                url: "http://127.0.0.1:8080/health".into(),
                expect_status: 200,
                body_contains: "ok".into(),
            }))
        );
        assert_eq!(d.health_checks[1].name, "check-1");
        assert!(matches!(
            d.health_checks[1].kind,
            Some(pb::health_check::Kind::Tcp(_))
        ));
        match &d.health_checks[2].kind {
            Some(pb::health_check::Kind::Exec(c)) => assert_eq!(c.timeout_ms, 2_000),
            other => panic!("expected exec check, got {other:?}"),
        }
        assert_eq!(
            d.thresholds,
            Some(pb::Thresholds {
                max_rss_bytes: 512 << 20,
                max_cpu_percent: 80.0,
                sustained_samples: 4,
                max_rss_ratio: 0.0,
                max_cpu_ratio: 0.0,
            })
        );
        assert_eq!(
            (
                d.min_healthy_time_ms,
                d.healthy_deadline_ms,
                d.commit_deadline_ms
            ),
            (10_000, 300_000, 600_000)
        );
        assert_eq!(spec.targets.hosts, ["web-1"]);
        assert_eq!(
            spec.targets.labels.get("role").map(String::as_str),
            Some("web")
        );
        assert_eq!(
            spec.strategy,
            Strategy {
                batches: BatchPlan::Canary(vec![
                    Count::Absolute(1),
                    Count::Percent(10.0),
                    Count::Percent(50.0),
                    Count::Percent(100.0)
                ]),
                pause_after_canary: true,
                max_unavailable: Count::Percent(25.0),
                max_failures: Count::Percent(10.0),
                max_host_rollbacks: None,
                auto_rollback: false,
                progress_deadline: Duration::from_secs(3600),
                stage_parallelism: 8,
                rollback_parallelism: 20,
            }
        );
    }

    #[test]
    fn minimal_spec_gets_the_documented_defaults() {
        let spec = parse(MINIMAL).expect("minimal parses");
        assert_eq!(spec.strategy, Strategy::default());
        assert_eq!(spec.artifact.digest, None);
        let d = &spec.definition;
        assert_eq!(
            (
                d.min_healthy_time_ms,
                d.healthy_deadline_ms,
                d.commit_deadline_ms
            ),
            (10_000, 300_000, 600_000)
        );
        match &d.supervision {
            Some(pb::service_definition::Supervision::Exec(e)) => {
                assert_eq!(e.restart, pb::RestartPolicy::OnFailure as i32);
                assert_eq!(e.stop_timeout_ms, 10_000);
            }
            other => panic!("expected exec, got {other:?}"),
        }
        assert_eq!(d.thresholds.as_ref().map(|t| t.sustained_samples), Some(3));
    }

    #[test]
    fn systemd_and_hooks_modes_parse() {
        let systemd = MINIMAL.replace("exec = [\"./bin/web\"]", "systemd_unit = \"web.service\"");
        let spec = parse(&systemd).expect("systemd mode");
        assert!(matches!(
            spec.definition.supervision,
            Some(pb::service_definition::Supervision::Systemd(ref s)) if s.unit == "web.service"
        ));
        let hooks = MINIMAL.replace(
            "exec = [\"./bin/web\"]",
            "start = [\"./bin/start\"]\nstop = { command = [\"./bin/stop\"], timeout = \"5s\" }",
        );
        match parse(&hooks).expect("hooks mode").definition.supervision {
            Some(pb::service_definition::Supervision::HooksOnly(h)) => {
                assert_eq!(
                    h.start.map(|c| c.argv),
                    Some(vec!["./bin/start".to_string()])
                );
                assert_eq!(h.stop.map(|c| c.timeout_ms), Some(5_000));
            }
            other => panic!("expected hooks mode, got {other:?}"),
        }
    }

    #[test]
    fn batch_modes_and_counts_parse() {
        let s = parse(&minimal_with("strategy", "batch_size = 3")).expect("batch_size");
        assert_eq!(s.strategy.batches, BatchPlan::Size(3));
        let s = parse(&minimal_with("strategy", "batch_percent = 25")).expect("integer percent");
        assert_eq!(s.strategy.batches, BatchPlan::Percent(25.0));
        let s = parse(&minimal_with(
            "strategy",
            "batch_percent = 12.5\nmax_unavailable = 4\nmax_failures = \"50%\"",
        ))
        .expect("float percent");
        assert_eq!(s.strategy.batches, BatchPlan::Percent(12.5));
        assert_eq!(s.strategy.max_unavailable, Count::Absolute(4));
        assert_eq!(s.strategy.max_failures, Count::Percent(50.0));
        let s = parse(&minimal_with("thresholds", "max_rss = 1048576")).expect("integer bytes");
        assert_eq!(
            s.definition.thresholds.map(|t| t.max_rss_bytes),
            Some(1 << 20)
        );
        let s = parse(&minimal_with("thresholds", "max_rss = \"2GB\"")).expect("decimal units");
        assert_eq!(
            s.definition.thresholds.map(|t| t.max_rss_bytes),
            Some(2_000_000_000)
        );
    }

    #[test]
    fn strategy_and_counts_round_trip_through_json() {
        let strategy = parse(FULL).expect("full").strategy;
        let json = serde_json::to_string(&strategy).expect("serialize");
        assert!(
            json.contains("\"10%\""),
            "percent persisted as written: {json}"
        );
        let back: Strategy = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, strategy);
        let targets = Targets {
            hosts: vec!["a".into()],
            labels: BTreeMap::from([("role".into(), "web".into())]),
        };
        let back: Targets =
            serde_json::from_str(&serde_json::to_string(&targets).expect("ser")).expect("de");
        assert_eq!(back, targets);
    }

    #[test]
    fn count_resolves_up_and_budgets_round_down() {
        assert_eq!(Count::Percent(10.0).resolve(3), 1);
        assert_eq!(Count::Percent(10.0).resolve_floor(3), 0);
        assert_eq!(Count::Percent(10.0).resolve(30), 3, "no float noise");
        assert_eq!(Count::Percent(33.0).resolve(100), 33);
        assert_eq!(Count::Percent(100.0).resolve(7), 7);
        assert_eq!(Count::Absolute(5).resolve(3), 3, "capped at the fleet");
        assert_eq!(Count::Percent(50.0).resolve(0), 0);
        assert_eq!("25%".parse::<Count>(), Ok(Count::Percent(25.0)));
        assert_eq!(" 3 ".parse::<Count>(), Ok(Count::Absolute(3)));
        assert!("101%".parse::<Count>().is_err());
        assert!("-1%".parse::<Count>().is_err());
        assert!("x%".parse::<Count>().is_err());
    }

    #[test]
    fn unknown_missing_and_mistyped_keys_name_the_key() {
        rejects(&minimal_with("strategy", "batch_szie = 2"), &["batch_szie"]);
        rejects(&format!("colour = \"blue\"\n{MINIMAL}"), &["colour"]);
        rejects(&minimal_with("run", "restrat = \"always\""), &["restrat"]);
        rejects(&MINIMAL.replace("release = \"v2\"\n", ""), &["release"]);
        rejects(
            &MINIMAL.replace("[targets]\nhosts = [\"web-1\"]\n", ""),
            &["targets"],
        );
        rejects(
            &minimal_with("strategy", "batch_size = \"two\""),
            &["batch_size"],
        );
        rejects(
            &minimal_with("strategy", "auto_rollback = \"yes\""),
            &["auto_rollback"],
        );
        rejects(
            &minimal_with("run", "restart = \"sometimes\""),
            &["restart", "sometimes"],
        );
        rejects(
            &minimal_with("strategy", "min_healthy_time = \"ten\""),
            &["min_healthy_time"],
        );
        rejects(
            &minimal_with("strategy", "min_healthy_time = \"-5s\""),
            &["min_healthy_time", "like \"10s\""],
        );
        rejects(
            &minimal_with("strategy", "max_unavailable = -1"),
            &["max_unavailable", "negative"],
        );
        rejects(
            &minimal_with("strategy", "max_failures = 0.5"),
            &["max_failures", "25%"],
        );
        rejects(
            &minimal_with("thresholds", "max_rss = \"12 parsecs\""),
            &["max_rss"],
        );
        rejects("service = ", &["release spec"]);
    }

    #[test]
    fn absurd_values_are_refused_with_the_key_and_a_fix() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "strategy",
                "batch_size = 0",
                &["strategy.batch_size", "at least 1"],
            ),
            ("strategy", "batch_percent = 0", &["strategy.batch_percent"]),
            (
                "strategy",
                "batch_percent = 150",
                &["strategy.batch_percent"],
            ),
            (
                "strategy",
                "batch_size = 2\ncanary = [\"100%\"]",
                &["`strategy`", "more than one"],
            ),
            (
                "strategy",
                "canary = [1, \"50%\"]",
                &["strategy.canary", "100%"],
            ),
            (
                "strategy",
                "canary = [\"50%\", \"10%\", \"100%\"]",
                &["strategy.canary[1]", "increase"],
            ),
            (
                "strategy",
                "canary = [3, 2, \"100%\"]",
                &["strategy.canary[1]", "increase"],
            ),
            (
                "strategy",
                "canary = [\"10%\", 5, \"100%\"]",
                &["strategy.canary[1]", "counts first"],
            ),
            (
                "strategy",
                "canary = [0, \"100%\"]",
                &["strategy.canary[0]"],
            ),
            (
                "strategy",
                "canary = [\"0%\", \"100%\"]",
                &["strategy.canary[0]"],
            ),
            ("strategy", "canary = [1, \"200%\"]", &["canary", "100%"]),
            (
                "strategy",
                "max_unavailable = 0",
                &["strategy.max_unavailable"],
            ),
            (
                "strategy",
                "max_unavailable = \"0%\"",
                &["strategy.max_unavailable"],
            ),
            (
                "strategy",
                "pause_after_canary = true",
                &["strategy.pause_after_canary"],
            ),
            (
                "strategy",
                "healthy_deadline = \"0s\"",
                &["strategy.healthy_deadline", "zero"],
            ),
            (
                "strategy",
                "min_healthy_time = \"1m\"\nhealthy_deadline = \"30s\"",
                &["strategy.healthy_deadline", "min_healthy_time"],
            ),
            (
                "strategy",
                "progress_deadline = \"1m\"",
                &["strategy.progress_deadline", "healthy_deadline"],
            ),
            (
                "strategy",
                "commit_deadline = \"0s\"",
                &["strategy.commit_deadline"],
            ),
            (
                "strategy",
                "stage_parallelism = 0",
                &["strategy.stage_parallelism"],
            ),
            (
                "strategy",
                "rollback_parallelism = 0",
                &["strategy.rollback_parallelism"],
            ),
            (
                "run",
                "systemd_unit = \"web.service\"",
                &["`run`", "several"],
            ),
            ("run", "stop_timeout = \"0s\"", &["run.stop_timeout"]),
            (
                "thresholds",
                "max_cpu_percent = 0.0",
                &["thresholds.max_cpu_percent"],
            ),
            (
                "thresholds",
                "max_cpu_percent = -5.0",
                &["thresholds.max_cpu_percent"],
            ),
            ("thresholds", "max_rss = 0", &["thresholds.max_rss"]),
            (
                "thresholds",
                "sustained_samples = 0",
                &["thresholds.sustained_samples"],
            ),
            ("hooks", "before_stop = []", &["hooks.before_stop", "empty"]),
            (
                "hooks",
                "after_switch = { command = [\"x\"], timeout = \"0s\" }",
                &["hooks.after_switch.timeout"],
            ),
            ("env", "\"A=B\" = \"x\"", &["env.A=B"]),
            (
                "artifact",
                "digest = \"md5:abc\"",
                &["artifact.digest", "sha256"],
            ),
            ("targets", "hosts = [\"\"]", &["targets.hosts[0]"]),
        ];
        for (section, line, needles) in cases {
            let text = if *section == "targets" {
                MINIMAL.replace("hosts = [\"web-1\"]", line)
            } else {
                minimal_with(section, line)
            };
            rejects(&text, needles);
        }
    }

    #[test]
    fn names_run_modes_targets_and_checks_are_validated() {
        for bad_name in ["../etc", "a/b", "..", ".hidden", "", "a b"] {
            rejects(
                &MINIMAL.replace("release = \"v2\"", &format!("release = {bad_name:?}")),
                &["`release`"],
            );
            rejects(
                &MINIMAL.replace("service = \"web\"", &format!("service = {bad_name:?}")),
                &["`service`"],
            );
        }
        rejects(
            &MINIMAL.replace("exec = [\"./bin/web\"]", "exec = []"),
            &["run.exec", "empty"],
        );
        rejects(
            &MINIMAL.replace("exec = [\"./bin/web\"]", "exec = [\"\"]"),
            &["run.exec"],
        );
        rejects(
            &MINIMAL.replace("exec = [\"./bin/web\"]", ""),
            &["`run`", "exactly one"],
        );
        rejects(
            &MINIMAL.replace("exec = [\"./bin/web\"]", "stop = [\"./s\"]"),
            &["run.start"],
        );
        rejects(
            &MINIMAL.replace(
                "exec = [\"./bin/web\"]",
                "systemd_unit = \"w.service\"\nrestart = \"never\"",
            ),
            &["run.restart"],
        );
        rejects(
            &MINIMAL.replace("exec = [\"./bin/web\"]", "systemd_unit = \"a/b\""),
            &["run.systemd_unit"],
        );
        // Ceilings need the process the agent runs: refused, not ignored,
        // under systemd or scripts; kept with exec.
        for (line, key) in [
            ("max_rss = \"512MiB\"", "thresholds.max_rss"),
            ("max_cpu_percent = 80.0", "thresholds.max_cpu_percent"),
            ("max_rss_ratio = 1.5", "thresholds.max_rss_ratio"),
            ("max_cpu_ratio = 2.0", "thresholds.max_cpu_ratio"),
        ] {
            let with = minimal_with("thresholds", line);
            rejects(
                &with.replace("exec = [\"./bin/web\"]", "systemd_unit = \"web.service\""),
                &[key, "run.systemd_unit", "never be checked", "run.exec"],
            );
            rejects(
                &with.replace("exec = [\"./bin/web\"]", "start = [\"./bin/start\"]"),
                &[key, "run.start", "run.exec"],
            );
            assert!(parse(&with).is_ok(), "{line} with exec");
        }
        // sustained_samples alone sets no ceiling.
        assert!(
            parse(
                &minimal_with("thresholds", "sustained_samples = 5")
                    .replace("exec = [\"./bin/web\"]", "systemd_unit = \"web.service\"")
            )
            .is_ok()
        );
        rejects(
            &MINIMAL.replace("hosts = [\"web-1\"]", ""),
            &["`targets`", "targets.hosts"],
        );
        rejects(
            &MINIMAL.replace("path = \"web.tar.gz\"", "path = \"\""),
            &["artifact.path"],
        );

        let health = |body: &str| format!("{MINIMAL}[[health]]\n{body}\n");
        rejects(
            &health("http = \"https://x/health\""),
            &["health[0].http", "http://"],
        );
        rejects(&health("http = \"http://\""), &["health[0].http"]);
        rejects(
            &health("http = \"http://x/\"\ntcp = \"x:1\""),
            &["health[0]", "exactly one"],
        );
        rejects(&health("name = \"h\""), &["health[0]", "exactly one"]);
        rejects(
            &health("tcp = \"localhost\""),
            &["health[0].tcp", "host:port"],
        );
        rejects(
            &health("tcp = \"x:1\"\nexpect_status = 200"),
            &["health[0].expect_status"],
        );
        rejects(
            &health("http = \"http://x/\"\nexpect_status = 42"),
            &["health[0].expect_status"],
        );
        rejects(&health("exec = []"), &["health[0].exec"]);
        rejects(
            &health("tcp = \"x:1\"\ninterval = \"0s\""),
            &["health[0].interval"],
        );
        rejects(
            &health("tcp = \"x:1\"\nfailure_threshold = 0"),
            &["health[0].failure_threshold"],
        );
        rejects(
            &format!(
                "{MINIMAL}[[health]]\nname = \"a\"\ntcp = \"x:1\"\n[[health]]\nname = \"a\"\ntcp = \"x:2\"\n"
            ),
            &["health[1].name"],
        );
    }

    #[test]
    fn load_spec_resolves_the_artifact_against_the_spec_directory_and_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("web.toml");
        std::fs::write(&path, MINIMAL).expect("write spec");
        let spec = load_spec(&path).expect("loads");
        assert_eq!(spec.artifact.path, dir.path().join("web.tar.gz"));

        std::fs::write(&path, minimal_with("strategy", "batch_size = 0")).expect("write spec");
        let err = load_spec(&path).expect_err("invalid").to_string();
        assert!(
            err.contains("web.toml") && err.contains("strategy.batch_size"),
            "{err}"
        );

        let err = load_spec(dir.path().join("missing.toml"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }

    #[test]
    fn verify_artifact_streams_sha256_and_refuses_a_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.tar.gz");
        // Larger than one read buffer, so the streaming loop runs more than once.
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write artifact");
        let expected = format!("sha256:{}", hex::encode(Sha256::digest(&data)));

        let got = verify_artifact(&path, None).expect("hashes");
        assert_eq!(
            got,
            ArtifactDigest {
                digest: expected.clone(),
                size: 200_000
            }
        );
        assert_eq!(got.to_pb().size, 200_000);
        verify_artifact(
            &path,
            Some(&expected.to_uppercase().replace("SHA256:", "sha256:")),
        )
        .expect("case-insensitive");

        let wrong = format!("sha256:{}", "0".repeat(64));
        let err = verify_artifact(&path, Some(&wrong))
            .expect_err("mismatch")
            .to_string();
        assert!(
            err.contains(&wrong) && err.contains(&expected) && err.contains("artifact.digest"),
            "{err}"
        );

        let err = verify_artifact(&dir.path().join("nope.tar.gz"), None)
            .expect_err("missing")
            .to_string();
        assert!(
            err.contains("nope.tar.gz") && err.contains("artifact.path"),
            "{err}"
        );
    }
}
