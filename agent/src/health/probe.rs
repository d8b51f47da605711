//! One probe of one health check (HTTP GET, TCP connect, or a command that must
//! exit 0), and [`run_command`], which runs hooks and exec checks alike.
//!
//! A probe never errors: whatever goes wrong becomes [`ProbeOutcome::Fail`] with a
//! short reason that ends up in reports ("GET http://127.0.0.1:8080/health:
//! status 500, want 2xx"). Thresholds and cadence belong to the tracker.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use http::Uri;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::release::{CheckKind, Command, HealthCheck};

/// Runs one probe of a check. Real: [`RealProbe`]; fakes in tests.
pub trait HealthProbe: Send + Sync + 'static {
    /// Probes `check` once, within `check.timeout`.
    fn probe<'a>(
        &'a self,
        check: &'a HealthCheck,
        ctx: &'a ProbeContext,
    ) -> BoxFuture<'a, ProbeOutcome>;
}

/// Where a probe runs: what exec checks need from the release.
#[derive(Debug, Clone)]
pub struct ProbeContext {
    /// Working directory of exec checks, and the base of their relative programs.
    pub release_dir: PathBuf,
    /// Extra environment of exec checks (the release's `env`).
    pub env: BTreeMap<String, String>,
    /// The user exec checks run as.
    pub run_as: Option<crate::release::RunAs>,
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The check passed.
    Pass,
    /// The check failed, with a short human reason naming what was probed.
    Fail(String),
}

/// The most of a response body an HTTP check reads: a health endpoint answers
/// with a few bytes, and a check must not let a service make the agent buffer
/// without bound.
pub const MAX_HTTP_BODY: usize = 1024 * 1024;

/// The real probe: HTTP via hyper's pooled client, TCP via tokio, exec via
/// [`run_command`].
#[derive(Debug)]
pub struct RealProbe {
    /// Shared connection pool: a check reuses its connection, as a real
    /// service's clients do. Plain HTTP only (specs accept only `http://`),
    /// and no proxy: a check of `127.0.0.1` must never go through `HTTP_PROXY`.
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl RealProbe {
    /// Creates a probe with its own HTTP client.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // The timer lets the pool close connections idle for 90 s.
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        RealProbe { client }
    }
}

impl Default for RealProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthProbe for RealProbe {
    fn probe<'a>(
        &'a self,
        check: &'a HealthCheck,
        ctx: &'a ProbeContext,
    ) -> BoxFuture<'a, ProbeOutcome> {
        async move {
            match &check.kind {
                CheckKind::Http {
                    url,
                    expect_status,
                    body_contains,
                } => {
                    let get = self.http(url, *expect_status, body_contains.as_deref());
                    within(check.timeout, get).await
                }
                CheckKind::Tcp { address } => within(check.timeout, tcp(address)).await,
                CheckKind::Exec(cmd) => exec(cmd, check.timeout, ctx).await,
            }
        }
        .boxed()
    }
}

/// Bounds a probe by the check's timeout.
async fn within(timeout: Duration, probe: impl Future<Output = ProbeOutcome>) -> ProbeOutcome {
    match tokio::time::timeout(timeout, probe).await {
        Ok(outcome) => outcome,
        Err(_) => timed_out(timeout),
    }
}

fn timed_out(after: Duration) -> ProbeOutcome {
    ProbeOutcome::Fail(format!(
        "timed out after {}",
        humantime::format_duration(after)
    ))
}

impl RealProbe {
    async fn http(
        &self,
        url: &str,
        expect_status: Option<u16>,
        body_contains: Option<&str>,
    ) -> ProbeOutcome {
        let fail = |why: String| ProbeOutcome::Fail(format!("GET {url}: {why}"));
        let uri = match url.parse::<Uri>() {
            Ok(uri) => uri,
            Err(e) => return fail(format!("invalid URL: {e}")),
        };
        let response = match self.client.get(uri).await {
            Ok(r) => r,
            Err(e) => return fail(describe_client_error(&e)),
        };
        let status = response.status();
        let status_ok = match expect_status {
            Some(want) => status.as_u16() == want,
            None => status.is_success(),
        };
        if !status_ok {
            let want = expect_status.map_or_else(|| "2xx".to_owned(), |s| s.to_string());
            return fail(format!("status {}, want {want}", status.as_u16()));
        }
        let Some(needle) = body_contains else {
            return ProbeOutcome::Pass;
        };
        let body = match Limited::new(response.into_body(), MAX_HTTP_BODY)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => {
                return fail(format!(
                    "body is over {} KiB, the most a check reads; serve a short health body",
                    MAX_HTTP_BODY / 1024
                ));
            }
            Err(e) => return fail(format!("reading body: {}", innermost(&*e))),
        };
        if String::from_utf8_lossy(&body).contains(needle) {
            ProbeOutcome::Pass
        } else {
            fail(format!("body does not contain {needle:?}"))
        }
    }
}

/// The client's own message is "client error (Connect)"; the useful part is
/// the innermost cause.
fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    let cause = innermost(e);
    if e.is_connect() {
        format!("connect: {cause}")
    } else {
        cause
    }
}

fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

async fn tcp(address: &str) -> ProbeOutcome {
    match tokio::net::TcpStream::connect(address).await {
        Ok(_) => ProbeOutcome::Pass,
        Err(e) => ProbeOutcome::Fail(format!("connect {address}: {e}")),
    }
}

async fn exec(cmd: &Command, check_timeout: Duration, ctx: &ProbeContext) -> ProbeOutcome {
    // The check's timeout bounds every probe; the command's own can only shorten it.
    let cmd = Command {
        argv: cmd.argv.clone(),
        timeout: cmd.timeout.min(check_timeout),
    };
    let program = cmd.argv.first().map_or("", String::as_str);
    match run_command(&cmd, &ctx.release_dir, &ctx.env, None, ctx.run_as).await {
        Ok(()) => ProbeOutcome::Pass,
        Err(CommandError::Spawn { source, .. }) => {
            ProbeOutcome::Fail(format!("exec {program}: {source}"))
        }
        Err(CommandError::Exit { status, .. }) => {
            ProbeOutcome::Fail(format!("exec {program}: {status}"))
        }
        Err(CommandError::Timeout { after, .. }) => timed_out(after),
    }
}

/// A hook or exec check that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started.
    #[error(
        "could not start {program}: {source}; check that it exists in the release and is executable"
    )]
    Spawn {
        /// `argv[0]` as written in the definition.
        program: String,
        /// Why the spawn (or opening the log) failed.
        source: io::Error,
    },
    /// The program ran and did not exit 0.
    #[error("{program} failed with {status}; its output is in the service's hook log")]
    Exit {
        /// `argv[0]` as written in the definition.
        program: String,
        /// "exit status 3" or "killed by signal 9".
        status: String,
    },
    /// The program ran past its timeout; it and its process group were killed.
    #[error("{program} was still running after {}, killed it; make it finish sooner or raise its timeout", humantime::format_duration(*.after))]
    Timeout {
        /// `argv[0]` as written in the definition.
        program: String,
        /// The timeout that expired.
        after: Duration,
    },
}

/// Runs `cmd` in `cwd` with `env` added to the agent's environment, within
/// `cmd.timeout`, appending its stdout and stderr to `log` when given (else both
/// are discarded).
///
/// The command gets its own process group; on timeout, or when the returned
/// future is dropped before the command ends, the whole group is killed, so a
/// hook's own children do not outlive it. Children left behind by a command that
/// exits by itself are left alone (a start hook may daemonize the service).
///
/// A relative `argv[0]` containing `/` is resolved against `cwd`.
pub async fn run_command(
    cmd: &Command,
    cwd: &Path,
    env: &BTreeMap<String, String>,
    log: Option<&Path>,
    run_as: Option<crate::release::RunAs>,
) -> Result<(), CommandError> {
    let Some(program) = cmd.argv.first() else {
        return Err(CommandError::Spawn {
            program: String::new(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "empty argv"),
        });
    };
    let spawn_err = |source: io::Error| CommandError::Spawn {
        program: program.clone(),
        source,
    };
    let resolved = resolve_program(program, cwd);
    let mut child = spawn_retrying(|| {
        let (stdout, stderr) = match log {
            None => (Stdio::null(), Stdio::null()),
            Some(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("open log {}: {e}", path.display()))
                    })?;
                (Stdio::from(file.try_clone()?), Stdio::from(file))
            }
        };
        let mut c = tokio::process::Command::new(&resolved);
        c.args(&cmd.argv[1..])
            .current_dir(cwd)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        if let Some(u) = run_as {
            c.uid(u.uid).gid(u.gid);
        }
        c.spawn()
    })
    .await
    .map_err(spawn_err)?;

    let mut group = GroupGuard(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw),
    );
    match tokio::time::timeout(cmd.timeout, child.wait()).await {
        Ok(Ok(status)) => {
            group.disarm();
            if status.success() {
                Ok(())
            } else {
                Err(CommandError::Exit {
                    program: program.clone(),
                    status: describe_status(status),
                })
            }
        }
        Ok(Err(e)) => {
            group.disarm();
            Err(spawn_err(e))
        }
        Err(_) => {
            // The leader is not reaped yet, so its pid still names our group.
            group.kill();
            // Reap it; after SIGKILL this is immediate.
            let _ = child.wait().await;
            Err(CommandError::Timeout {
                program: program.clone(),
                after: cmd.timeout,
            })
        }
    }
}

/// Kills a command's process group when dropped while armed: on timeout and when
/// the caller abandons [`run_command`] (e.g. the agent shuts down mid-hook).
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH: the group is already gone, which is what we wanted.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn resolve_program(program: &str, cwd: &Path) -> PathBuf {
    let path = Path::new(program);
    if path.is_relative() && program.contains('/') {
        cwd.join(path)
    } else {
        path.to_path_buf()
    }
}

/// Spawns, retrying briefly on ETXTBSY: a script written just now (by unpacking a
/// release) can be briefly "busy" while another thread's fork still holds its
/// write descriptor.
async fn spawn_retrying(
    mut spawn: impl FnMut() -> io::Result<tokio::process::Child>,
) -> io::Result<tokio::process::Child> {
    let mut attempts = 0;
    loop {
        match spawn() {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && attempts < 10 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by signal {sig} ({s})"),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An HTTP server on 127.0.0.1:0 answering every request with one canned
    /// response; stops when dropped.
    struct CannedServer {
        url: String,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for CannedServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn canned(status: &str, body: &str) -> CannedServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let response = response.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        CannedServer {
            url: format!("http://{addr}/health"),
            task,
        }
    }

    fn check(kind: CheckKind, timeout: Duration) -> HealthCheck {
        HealthCheck {
            name: "t".into(),
            kind,
            interval: Duration::from_secs(1),
            timeout,
            failure_threshold: 1,
            success_threshold: 1,
        }
    }

    fn http(url: &str, expect_status: Option<u16>, body_contains: Option<&str>) -> HealthCheck {
        check(
            CheckKind::Http {
                url: url.into(),
                expect_status,
                body_contains: body_contains.map(Into::into),
            },
            Duration::from_secs(2),
        )
    }

    fn exec_check(argv: &[&str], timeout: Duration) -> HealthCheck {
        check(
            CheckKind::Exec(Command {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                timeout: Duration::from_secs(60),
            }),
            timeout,
        )
    }

    fn ctx(dir: &Path) -> ProbeContext {
        ProbeContext {
            release_dir: dir.to_path_buf(),
            env: BTreeMap::from([("PROBE_VAR".to_owned(), "bar".to_owned())]),
            run_as: None,
        }
    }

    fn free_port_addr() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        addr
    }

    /// One probe of `check` by a fresh [`RealProbe`], from `/`.
    async fn probe_once(check: &HealthCheck) -> ProbeOutcome {
        RealProbe::new().probe(check, &ctx(Path::new("/"))).await
    }

    fn fail_reason(outcome: ProbeOutcome) -> String {
        match outcome {
            ProbeOutcome::Fail(why) => why,
            ProbeOutcome::Pass => panic!("expected a failure, got Pass"),
        }
    }

    #[tokio::test]
    async fn http_2xx_with_expected_body_passes() {
        let server = canned("200 OK", "ok").await;
        let probe = RealProbe::new();
        let c = ctx(Path::new("/"));
        assert_eq!(
            probe.probe(&http(&server.url, None, None), &c).await,
            ProbeOutcome::Pass
        );
        assert_eq!(
            probe
                .probe(&http(&server.url, Some(200), Some("ok")), &c)
                .await,
            ProbeOutcome::Pass
        );
    }

    #[tokio::test]
    async fn http_500_fails_with_status_in_reason() {
        let server = canned("500 Internal Server Error", "unhealthy").await;
        let why = fail_reason(probe_once(&http(&server.url, None, None)).await);
        assert_eq!(why, format!("GET {}: status 500, want 2xx", server.url));
    }

    #[tokio::test]
    async fn http_expected_status_is_exact() {
        let server = canned("200 OK", "ok").await;
        let why = fail_reason(probe_once(&http(&server.url, Some(204), None)).await);
        assert!(why.contains("status 200, want 204"), "{why}");
    }

    #[tokio::test]
    async fn http_wrong_body_fails() {
        let server = canned("200 OK", "starting").await;
        let why = fail_reason(probe_once(&http(&server.url, None, Some("ready"))).await);
        assert!(why.contains("body does not contain \"ready\""), "{why}");
    }

    #[tokio::test]
    async fn http_body_over_the_limit_fails_naming_the_limit() {
        let server = canned("200 OK", &"x".repeat(MAX_HTTP_BODY + 1)).await;
        let why = fail_reason(probe_once(&http(&server.url, None, Some("ready"))).await);
        assert!(why.contains("body is over 1024 KiB"), "{why}");
        // Without a body to match, the body is not read and its size is moot.
        assert_eq!(
            probe_once(&http(&server.url, None, None)).await,
            ProbeOutcome::Pass
        );
    }

    #[tokio::test]
    async fn http_checks_reuse_their_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/health", listener.local_addr().expect("addr"));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&accepted);
        let server = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if conn.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        let probe = RealProbe::new();
        let c = ctx(Path::new("/"));
        for _ in 0..3 {
            assert_eq!(
                probe.probe(&http(&url, None, Some("ok")), &c).await,
                ProbeOutcome::Pass
            );
        }
        server.abort();
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn http_malformed_url_fails_naming_it() {
        let why = fail_reason(probe_once(&http("http://[::1/health", None, None)).await);
        assert!(
            why.starts_with("GET http://[::1/health: invalid URL"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn http_to_closed_port_fails_with_connect() {
        let url = format!("http://{}/health", free_port_addr());
        let why = fail_reason(probe_once(&http(&url, None, None)).await);
        assert!(why.starts_with(&format!("GET {url}: connect")), "{why}");
    }

    #[tokio::test]
    async fn tcp_connect_passes_on_listener_and_fails_on_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let open = listener.local_addr().expect("addr").to_string();
        let probe = RealProbe::new();
        let c = ctx(Path::new("/"));
        let tcp = |address: String| check(CheckKind::Tcp { address }, Duration::from_secs(2));
        assert_eq!(probe.probe(&tcp(open), &c).await, ProbeOutcome::Pass);
        let closed = free_port_addr();
        let why = fail_reason(probe.probe(&tcp(closed.clone()), &c).await);
        assert!(why.starts_with(&format!("connect {closed}: ")), "{why}");
    }

    #[tokio::test]
    async fn exec_passes_on_zero_and_fails_on_nonzero_exit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let probe = RealProbe::new();
        let c = ctx(dir.path());
        let t = Duration::from_secs(5);
        assert_eq!(
            probe.probe(&exec_check(&["true"], t), &c).await,
            ProbeOutcome::Pass
        );
        assert_eq!(
            fail_reason(probe.probe(&exec_check(&["false"], t), &c).await),
            "exec false: exit status 1"
        );
        let why = fail_reason(
            probe
                .probe(&exec_check(&["/nonexistent/check"], t), &c)
                .await,
        );
        assert!(why.starts_with("exec /nonexistent/check: "), "{why}");
    }

    #[tokio::test]
    async fn exec_past_its_timeout_is_killed_and_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let why = fail_reason(
            RealProbe::new()
                .probe(
                    &exec_check(&["sleep", "5"], Duration::from_millis(200)),
                    &ctx(dir.path()),
                )
                .await,
        );
        assert_eq!(why, "timed out after 200ms");
    }

    fn write_script(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[tokio::test]
    async fn exec_relative_script_runs_in_release_dir_with_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("bin")).expect("mkdir");
        std::fs::write(dir.path().join("marker"), "").expect("marker");
        write_script(
            &dir.path().join("bin"),
            "check.sh",
            "test -f marker && test \"$PROBE_VAR\" = bar",
        );
        write_script(dir.path(), "broken.sh", "exit 3");
        let probe = RealProbe::new();
        let c = ctx(dir.path());
        let t = Duration::from_secs(5);
        assert_eq!(
            probe.probe(&exec_check(&["bin/check.sh"], t), &c).await,
            ProbeOutcome::Pass
        );
        assert_eq!(
            fail_reason(probe.probe(&exec_check(&["./broken.sh"], t), &c).await),
            "exec ./broken.sh: exit status 3"
        );
    }

    #[tokio::test]
    async fn run_command_appends_output_to_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("hooks.log");
        std::fs::write(&log, "before\n").expect("seed log");
        let cmd = Command {
            argv: vec!["sh".into(), "-c".into(), "echo out; echo err >&2".into()],
            timeout: Duration::from_secs(5),
        };
        run_command(&cmd, dir.path(), &BTreeMap::new(), Some(&log), None)
            .await
            .expect("command succeeds");
        let text = std::fs::read_to_string(&log).expect("read log");
        assert!(text.starts_with("before\n"), "{text}");
        assert!(text.contains("out\n") && text.contains("err\n"), "{text}");
    }

    #[tokio::test]
    async fn run_command_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("grandchild.pid");
        // The shell starts a grandchild that would outlive a plain kill of the shell.
        let cmd = Command {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "sleep 30 & echo $! > grandchild.pid; wait".into(),
            ],
            timeout: Duration::from_millis(300),
        };
        let err = run_command(&cmd, dir.path(), &BTreeMap::new(), None, None)
            .await
            .expect_err("times out");
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("raise its timeout"), "{err}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        // The grandchild was SIGKILLed; once its parent is gone it is reaped by init,
        // so poll until it disappears.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok() {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.contains(") Z ") {
                break; // killed, waiting to be reaped
            }
            assert!(
                std::time::Instant::now() < deadline,
                "grandchild {pid} survived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn run_command_reports_missing_program_and_exit_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = Command {
            argv: vec!["./nope.sh".into()],
            timeout: Duration::from_secs(5),
        };
        let err = run_command(&missing, dir.path(), &BTreeMap::new(), None, None)
            .await
            .expect_err("missing");
        assert!(matches!(err, CommandError::Spawn { .. }), "{err}");
        assert!(err.to_string().contains("./nope.sh"), "{err}");
        let failing = Command {
            argv: vec!["sh".into(), "-c".into(), "kill -9 $$".into()],
            timeout: Duration::from_secs(5),
        };
        let err = run_command(&failing, dir.path(), &BTreeMap::new(), None, None)
            .await
            .expect_err("killed");
        match err {
            CommandError::Exit { status, .. } => {
                assert!(status.starts_with("killed by signal 9"), "{status}")
            }
            other => panic!("unexpected {other}"),
        }
    }
}
