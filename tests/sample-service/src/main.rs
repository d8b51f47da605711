//! `sample-service`: the tiny HTTP service that tests and the `rollout dev` demo
//! deploy. Each release carries a `service.conf` that makes it behave well or
//! badly (unhealthy, memory-hungry, CPU-hungry, crashing, failing to bind), so
//! every path of a rollout can be exercised with one binary.
//!
//! Configuration, later sources overriding earlier ones:
//!
//! 1. `service.conf` in the working directory (the release directory):
//!    `key=value` lines, `#` comments; a missing file is fine.
//! 2. `PORT` from the environment.
//! 3. Flags: `--port N`, `--bind ADDR`, and `--<key> VALUE` (or `--<key>=VALUE`)
//!    for any conf key, with `-` or `_` in the key.
//!
//! Keys: `port` (required), `bind` (default `127.0.0.1`), `version` (reported),
//! `healthy` (default `true`; `false` makes `/health` answer 500), `alloc_mb`
//! (allocate and touch this many MiB at start), `burn_cpu_percent` (busy this
//! share of one core), `exit_after_ms` (exit 1 after this long, a crash),
//! `unhealthy_after_ms` (`/health` answers 500 once this long has passed since
//! start: a release that passes its checks, then goes bad),
//! `bind_fail` (`true`: exit 2 at once, as if the port were taken).
//!
//! Endpoints: `GET /` → `version=<v>\n` (plus `host=<SAMPLE_HOST>\n` when that
//! variable is set), `GET /health` → 200 `ok` or 500 `unhealthy`,
//! `GET /version` → `<v>\n`. Connections are kept alive, as real HTTP/1.1
//! services keep them, until the client asks to close (`connection: close`,
//! or HTTP/1.0) or sends nothing for 10 s.
//!
//! Exit codes: 1 after `exit_after_ms`, 2 when binding fails (real or
//! `bind_fail`), 3 on bad configuration.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the configuration file is looked for, relative to the working directory.
const CONF_FILE: &str = "service.conf";
/// Keys accepted in `service.conf` and as flags.
const KEYS: &[&str] = &[
    "port",
    "bind",
    "version",
    "healthy",
    "alloc_mb",
    "burn_cpu_percent",
    "exit_after_ms",
    "unhealthy_after_ms",
    "bind_fail",
];
/// Exit code for a configuration the service cannot run with.
const EXIT_BAD_CONFIG: u8 = 3;
/// Exit code when the listener cannot be bound.
const EXIT_BIND: u8 = 2;
/// Largest request head read before giving up on a client.
const MAX_HEAD: usize = 16 * 1024;

/// The resolved behaviour of this run.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    /// TCP port to listen on (0 picks one; the log line shows which).
    port: u16,
    /// Address to listen on.
    bind: IpAddr,
    /// Reported by `/` and `/version`, so tests can see which release answers.
    version: String,
    /// `false` makes `/health` fail, to simulate a bad release.
    healthy: bool,
    /// MiB allocated and touched at start, to trip RSS thresholds.
    alloc_mb: u64,
    /// Share of one core kept busy, to trip CPU thresholds.
    burn_cpu_percent: u32,
    /// Exit 1 after this long, to simulate a crash.
    exit_after: Option<Duration>,
    /// `/health` fails once this long has passed since start.
    unhealthy_after: Option<Duration>,
    /// Exit 2 at once, to simulate a port already in use.
    bind_fail: bool,
}

fn main() -> ExitCode {
    let conf_text = match std::fs::read_to_string(CONF_FILE) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return fail_config(&format!("read {CONF_FILE}: {e}")),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match resolve(&conf_text, std::env::var("PORT").ok(), &args) {
        Ok(c) => c,
        Err(e) => return fail_config(&e),
    };
    let host = std::env::var("SAMPLE_HOST").ok();
    run(config, host)
}

fn fail_config(why: &str) -> ExitCode {
    eprintln!("sample-service: {why}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

fn run(config: Config, host: Option<String>) -> ExitCode {
    if config.bind_fail {
        eprintln!(
            "sample-service version={} pid={}: bind_fail=true, exiting {EXIT_BIND}",
            config.version,
            std::process::id()
        );
        return ExitCode::from(EXIT_BIND);
    }
    let listener = match TcpListener::bind((config.bind, config.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sample-service: bind {}:{}: {e}", config.bind, config.port);
            return ExitCode::from(EXIT_BIND);
        }
    };
    let addr = listener.local_addr().map_or_else(
        |_| format!("{}:{}", config.bind, config.port),
        |a| a.to_string(),
    );
    eprintln!(
        "sample-service version={} pid={} listening on {addr} healthy={} alloc_mb={} burn_cpu_percent={} exit_after_ms={} unhealthy_after_ms={}",
        config.version,
        std::process::id(),
        config.healthy,
        config.alloc_mb,
        config.burn_cpu_percent,
        config.exit_after.map_or(0, |d| d.as_millis()),
        config.unhealthy_after.map_or(0, |d| d.as_millis()),
    );
    let started = Instant::now();

    // Held until the process exits; `black_box` keeps the touched pages from being
    // optimised away.
    let ballast = allocate(config.alloc_mb);
    std::hint::black_box(&ballast);
    if config.burn_cpu_percent > 0 {
        let percent = config.burn_cpu_percent;
        std::thread::spawn(move || burn_cpu(percent));
    }
    if let Some(after) = config.exit_after {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            eprintln!("sample-service: exit_after_ms elapsed, exiting 1");
            std::process::exit(1);
        });
    }

    let state = Arc::new((config, host));
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let state = Arc::clone(&state);
                std::thread::spawn(move || {
                    let (config, host) = &*state;
                    // A client that vanishes mid-request is its own problem.
                    let _ = serve(stream, config, host.as_deref(), started);
                });
            }
            Err(e) => eprintln!("sample-service: accept: {e}"),
        }
    }
    ExitCode::SUCCESS
}

/// Allocates `mb` MiB and writes every byte, so it counts in RSS.
fn allocate(mb: u64) -> Vec<u8> {
    let bytes = usize::try_from(mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX);
    vec![0xa5; bytes]
}

/// Keeps about `percent` of one core busy: busy for that share of every 100 ms.
fn burn_cpu(percent: u32) {
    const PERIOD: Duration = Duration::from_millis(100);
    let busy = PERIOD * percent.min(100) / 100;
    let mut spin = 0u64;
    loop {
        let start = Instant::now();
        while start.elapsed() < busy {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        if let Some(rest) = PERIOD.checked_sub(start.elapsed()).filter(|d| !d.is_zero()) {
            std::thread::sleep(rest);
        }
    }
}

/// Answers requests on one connection until the client closes it, asks to
/// close it or goes quiet for 10 s; `started` is when the service began
/// listening.
fn serve(
    stream: TcpStream,
    config: &Config,
    host: Option<&str>,
    started: Instant,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        // Drain the headers; there is never a body worth reading.
        let mut read = request_line.len();
        let mut close = request_line.trim_end().ends_with("HTTP/1.0");
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line)?;
            read += n;
            if n == 0 || line == "\r\n" || line == "\n" || read > MAX_HEAD {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.trim().eq_ignore_ascii_case("connection")
                && value.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
        let (status, body) = match parse_request_line(&request_line) {
            Some((method, path)) => respond(config, host, method, path, started.elapsed()),
            None => {
                close = true;
                (400, "bad request\n".to_owned())
            }
        };
        write!(
            out,
            "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
            reason(status),
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        )?;
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// Method and path (without query) of `GET /x?y HTTP/1.1`.
fn parse_request_line(line: &str) -> Option<(&str, &str)> {
    let mut parts = line.split_whitespace();
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/") || !target.starts_with('/') {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some((method, path))
}

/// Status and body for a request, `uptime` after start.
fn respond(
    config: &Config,
    host: Option<&str>,
    method: &str,
    path: &str,
    uptime: Duration,
) -> (u16, String) {
    if method != "GET" {
        return (405, "method not allowed\n".to_owned());
    }
    match path {
        "/" => {
            let mut body = format!("version={}\n", config.version);
            if let Some(h) = host {
                body.push_str(&format!("host={h}\n"));
            }
            (200, body)
        }
        "/health" if config.healthy && config.unhealthy_after.is_none_or(|d| uptime < d) => {
            (200, "ok".to_owned())
        }
        "/health" => (500, "unhealthy".to_owned()),
        "/version" => (200, format!("{}\n", config.version)),
        _ => (404, "not found\n".to_owned()),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    }
}

/// `key=value` pairs of a conf file, in order.
fn parse_conf(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "{CONF_FILE} line {}: {line:?} is not key=value",
                i + 1
            ));
        };
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(out)
}

/// `--key value` / `--key=value` pairs of the command line, keys with `_`.
fn parse_args(args: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(format!(
                "unexpected argument {arg:?}; flags look like --port 8080"
            ));
        };
        let (key, value) = match flag.split_once('=') {
            Some((k, v)) => (k, v.to_owned()),
            None => {
                let value = it.next().ok_or_else(|| format!("--{flag} needs a value"))?;
                (flag, value.clone())
            }
        };
        out.push((key.replace('-', "_"), value));
    }
    Ok(out)
}

/// Layers conf file, `PORT` and flags into a validated [`Config`].
fn resolve(conf: &str, env_port: Option<String>, args: &[String]) -> Result<Config, String> {
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for (source, pairs) in [
        (CONF_FILE, parse_conf(conf)?),
        (
            "PORT",
            env_port
                .map(|p| vec![("port".to_owned(), p)])
                .unwrap_or_default(),
        ),
        ("flags", parse_args(args)?),
    ] {
        for (key, value) in pairs {
            if !KEYS.contains(&key.as_str()) {
                return Err(format!(
                    "{source}: unknown key {key:?}; known keys: {}",
                    KEYS.join(", ")
                ));
            }
            values.insert(key, value);
        }
    }
    let get = |k: &str| values.get(k).map(String::as_str);
    let port = get("port").ok_or("port is required: set port= in service.conf, PORT, or --port")?;
    let exit_after_ms: u64 = number(get("exit_after_ms"), "exit_after_ms")?;
    let unhealthy_after_ms: u64 = number(get("unhealthy_after_ms"), "unhealthy_after_ms")?;
    let burn_cpu_percent: u32 = number(get("burn_cpu_percent"), "burn_cpu_percent")?;
    if burn_cpu_percent > 100 {
        return Err(format!(
            "burn_cpu_percent={burn_cpu_percent}: must be 0-100 (a share of one core)"
        ));
    }
    Ok(Config {
        port: port
            .parse()
            .map_err(|_| format!("port={port:?}: must be a number 0-65535"))?,
        bind: match get("bind") {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(b) => b
                .parse()
                .map_err(|_| format!("bind={b:?}: must be an IP address"))?,
        },
        version: get("version").unwrap_or("unknown").to_owned(),
        healthy: boolean(get("healthy"), "healthy", true)?,
        alloc_mb: number(get("alloc_mb"), "alloc_mb")?,
        burn_cpu_percent,
        exit_after: (exit_after_ms > 0).then(|| Duration::from_millis(exit_after_ms)),
        unhealthy_after: (unhealthy_after_ms > 0)
            .then(|| Duration::from_millis(unhealthy_after_ms)),
        bind_fail: boolean(get("bind_fail"), "bind_fail", false)?,
    })
}

fn number<T: std::str::FromStr + Default>(value: Option<&str>, key: &str) -> Result<T, String> {
    match value {
        None | Some("") => Ok(T::default()),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{key}={v:?}: must be a non-negative number")),
    }
}

fn boolean(value: Option<&str>, key: &str, default: bool) -> Result<bool, String> {
    match value {
        None | Some("") => Ok(default),
        Some("true" | "1" | "yes") => Ok(true),
        Some("false" | "0" | "no") => Ok(false),
        Some(v) => Err(format!("{key}={v:?}: must be true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn conf_file_sets_every_key() {
        let conf = "# a bad release\nport=8080\nversion = v2\n\nhealthy=false\nalloc_mb=64\n\
                    burn_cpu_percent=50\nexit_after_ms=1500\nunhealthy_after_ms=700\nbind_fail=true\nbind=0.0.0.0\n";
        let c = resolve(conf, None, &[]).expect("valid");
        assert_eq!(
            c,
            Config {
                port: 8080,
                bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                version: "v2".into(),
                healthy: false,
                alloc_mb: 64,
                burn_cpu_percent: 50,
                exit_after: Some(Duration::from_millis(1500)),
                unhealthy_after: Some(Duration::from_millis(700)),
                bind_fail: true,
            }
        );
    }

    #[test]
    fn defaults_are_a_healthy_quiet_service_on_localhost() {
        let c = resolve("port=1", None, &[]).expect("valid");
        assert_eq!(c.bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.version, "unknown");
        assert!(c.healthy && !c.bind_fail);
        assert_eq!((c.alloc_mb, c.burn_cpu_percent, c.exit_after), (0, 0, None));
    }

    #[test]
    fn env_overrides_conf_and_flags_override_both() {
        let conf = "port=1\nversion=v1\n";
        assert_eq!(resolve(conf, Some("2".into()), &[]).expect("valid").port, 2);
        let c = resolve(
            conf,
            Some("2".into()),
            &args(&["--port", "3", "--version=v9", "--burn-cpu-percent", "10"]),
        )
        .expect("valid");
        assert_eq!(
            (c.port, c.version.as_str(), c.burn_cpu_percent),
            (3, "v9", 10)
        );
    }

    #[test]
    fn bad_configuration_is_refused_with_the_key() {
        let missing = resolve("version=v1", None, &[]).expect_err("no port");
        assert!(missing.contains("port is required"), "{missing}");
        for (conf, key) in [
            ("port=1\nhealty=false", "healty"),
            ("port=http", "port"),
            ("port=1\nhealthy=maybe", "healthy"),
            ("port=1\nburn_cpu_percent=150", "burn_cpu_percent"),
            ("port=1\nalloc_mb=-1", "alloc_mb"),
            ("port=1\njust words", "line 2"),
        ] {
            let err = resolve(conf, None, &[]).expect_err(conf);
            assert!(err.contains(key), "{conf:?}: {err}");
        }
        assert!(resolve("port=1", None, &args(&["--port"])).is_err());
        assert!(resolve("port=1", None, &args(&["8080"])).is_err());
    }

    #[test]
    fn endpoints_report_version_and_health() {
        let mut c = resolve("port=1\nversion=v3", None, &[]).expect("valid");
        assert_eq!(
            respond(&c, None, "GET", "/", Duration::ZERO),
            (200, "version=v3\n".into())
        );
        assert_eq!(
            respond(&c, Some("web-1"), "GET", "/", Duration::ZERO),
            (200, "version=v3\nhost=web-1\n".into())
        );
        assert_eq!(
            respond(&c, None, "GET", "/version", Duration::ZERO),
            (200, "v3\n".into())
        );
        assert_eq!(
            respond(&c, None, "GET", "/health", Duration::ZERO),
            (200, "ok".into())
        );
        c.healthy = false;
        assert_eq!(
            respond(&c, None, "GET", "/health", Duration::ZERO),
            (500, "unhealthy".into())
        );
        c.healthy = true;
        c.unhealthy_after = Some(Duration::from_millis(700));
        let health_at = |ms| respond(&c, None, "GET", "/health", Duration::from_millis(ms)).0;
        assert_eq!((health_at(699), health_at(700)), (200, 500));
        assert_eq!(respond(&c, None, "GET", "/nope", Duration::ZERO).0, 404);
        assert_eq!(respond(&c, None, "POST", "/", Duration::ZERO).0, 405);
    }

    #[test]
    fn request_lines_are_parsed_without_query() {
        assert_eq!(
            parse_request_line("GET /health?x=1 HTTP/1.1\r\n"),
            Some(("GET", "/health"))
        );
        assert_eq!(parse_request_line("garbage\r\n"), None);
        assert_eq!(parse_request_line("GET health HTTP/1.1\r\n"), None);
    }

    /// Sends `requests` on one connection to a server of version `v7` and
    /// returns everything it answered until it closed the connection.
    fn exchange(requests: &[u8]) -> String {
        use std::io::Read;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = resolve("port=0\nversion=v7", None, &[]).expect("valid");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            serve(stream, &config, None, Instant::now()).expect("serve");
        });
        let mut client = TcpStream::connect(addr).expect("connect");
        client.write_all(requests).expect("write");
        let mut response = String::new();
        client.read_to_string(&mut response).expect("read to close");
        server.join().expect("server thread");
        response
    }

    #[test]
    fn keeps_the_connection_until_the_client_asks_to_close() {
        // Two requests on one connection; the second asks to close it (the
        // server must close, or the read above never ends).
        let response = exchange(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n",
        );
        let (first, second) = response
            .split_once("version=v7\n")
            .unwrap_or_else(|| panic!("no first body: {response}"));
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(!first.contains("connection: close"), "{response}");
        assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(second.contains("connection: close\r\n"), "{response}");
        assert!(second.ends_with("\r\n\r\nok"), "{response}");
    }

    #[test]
    fn closes_after_an_http_1_0_request() {
        let response = exchange(b"GET / HTTP/1.0\r\n\r\n");
        assert!(response.ends_with("\r\n\r\nversion=v7\n"), "{response}");
    }
}
