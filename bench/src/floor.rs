//! The fan-out's floor on this machine: the same fan-out over raw TCP, with
//! no HTTP/2, no gRPC and no coordinator logic, between the same kind of
//! processes on the same cores.
//!
//! A server process (`bench fanout-floor-server`, started by `bench fanout`
//! as a child, with a tokio runtime of the default size, as the
//! coordinator's) accepts N connections from this process. For each ping it
//! asks for on its stdin, every connection's task writes one
//! [`FRAME`]-byte message, reads the answer of the same size and counts it
//! down; the server prints the time from the wake-up of the first task to the
//! last answer. In this process one task per connection echoes what it
//! reads, as a swarm session answers a `Ping`.
//!
//! A gRPC ping and its answer are HTTP/2 DATA frames of about that size (a
//! 9-byte frame header, 5 bytes of gRPC framing and a message of 15 to 25
//! bytes), each written by one system call, as here. What the floor leaves
//! out is exactly what the coordinator and the swarm add to the kernel's and
//! tokio's work: HTTP/2, gRPC, protobuf and the coordinator's own
//! bookkeeping.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::swarm::raise_nofile;

/// Bytes of each message, both ways.
pub const FRAME: usize = 40;
/// Connections opened at once.
const CONNECT_PARALLELISM: usize = 64;
/// Longest wait for one ping's answers, or for the server to start.
const DEADLINE: Duration = Duration::from_secs(60);

/// Options of the hidden `bench fanout-floor-server`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Connections to accept before serving pings.
    #[arg(long)]
    pub sessions: usize,
}

/// `bench fanout-floor-server`: prints `port <P>` on stdout, accepts
/// `--sessions` connections on 127.0.0.1:P, prints `ready`, then for each
/// `ping` line on stdin fans a message out to every connection and prints the
/// microseconds until the last answer; ends at end of input.
pub async fn serve(args: &ServerArgs) -> Result<()> {
    raise_nofile(args.sessions as u64 + 256)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    say(&format!("port {port}"))?;
    let (go_tx, go_rx) = watch::channel(0u64);
    let left = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    for _ in 0..args.sessions {
        let (stream, _) = tokio::time::timeout(DEADLINE, listener.accept())
            .await
            .context("no client connected within 60 s")??;
        stream.set_nodelay(true)?;
        tasks.spawn(server_conn(
            stream,
            go_rx.clone(),
            left.clone(),
            done.clone(),
        ));
    }
    say("ready")?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut generation = 0u64;
    while let Some(line) = lines.next_line().await? {
        if line.trim() != "ping" {
            bail!("unknown request {line:?}: only `ping` is understood");
        }
        left.store(args.sessions, Ordering::Release);
        let finished = done.notified();
        generation += 1;
        let started = Instant::now();
        go_tx.send_replace(generation);
        tokio::time::timeout(DEADLINE, finished)
            .await
            .context("not every connection answered within 60 s")?;
        say(&started.elapsed().as_micros().to_string())?;
    }
    tasks.abort_all();
    Ok(())
}

/// One connection on the server: at each new generation, one message out
/// and its answer back, then the count of connections still to answer goes
/// down; the last one wakes the pinger.
async fn server_conn(
    mut stream: TcpStream,
    mut go: watch::Receiver<u64>,
    left: Arc<AtomicUsize>,
    done: Arc<Notify>,
) {
    let mut buf = [0u8; FRAME];
    let out = [1u8; FRAME];
    while go.changed().await.is_ok() {
        if stream.write_all(&out).await.is_err() || stream.read_exact(&mut buf).await.is_err() {
            return;
        }
        if left.fetch_sub(1, Ordering::AcqRel) == 1 {
            done.notify_one();
        }
    }
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// A running floor server and this process's N echoing connections.
pub struct Floor {
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    clients: JoinSet<()>,
}

impl Floor {
    /// Starts the server (`exe fanout-floor-server`) and connects `n` echoing
    /// clients to it.
    pub async fn start(exe: &std::path::Path, n: usize) -> Result<Floor> {
        raise_nofile(n as u64 + 1024)?;
        let mut child = Command::new(exe)
            .args(["fanout-floor-server", "--sessions", &n.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {} fanout-floor-server", exe.display()))?;
        let stdin = child.stdin.take().context("the floor server's stdin")?;
        let mut stdout =
            BufReader::new(child.stdout.take().context("the floor server's stdout")?).lines();
        let first = next_line(&mut stdout).await?;
        let port: u16 = first
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("the floor server said {first:?}, not its port"))?;
        let streams: Vec<TcpStream> = futures::stream::iter((0..n).map(|_| async move {
            let s = TcpStream::connect(("127.0.0.1", port)).await?;
            s.set_nodelay(true)?;
            Ok::<_, std::io::Error>(s)
        }))
        .buffer_unordered(CONNECT_PARALLELISM)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .context("connect to the floor server")?;
        let mut clients = JoinSet::new();
        for mut s in streams {
            clients.spawn(async move {
                let mut buf = [0u8; FRAME];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        return;
                    }
                }
            });
        }
        let ready = next_line(&mut stdout).await?;
        if ready != "ready" {
            bail!("the floor server said {ready:?}, not ready");
        }
        Ok(Floor {
            child,
            stdin,
            stdout,
            clients,
        })
    }

    /// One fan-out to every connection and back, as timed by the server, ms.
    pub async fn ping(&mut self) -> Result<f64> {
        self.stdin.write_all(b"ping\n").await?;
        self.stdin.flush().await?;
        let line = next_line(&mut self.stdout).await?;
        let us: f64 = line
            .parse()
            .with_context(|| format!("the floor server answered {line:?}"))?;
        Ok(us / 1000.0)
    }

    /// The server's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Ends the server and the clients.
    pub async fn stop(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        let _ = self.child.kill().await;
        self.clients.abort_all();
        while self.clients.join_next().await.is_some() {}
    }
}

async fn next_line(lines: &mut tokio::io::Lines<BufReader<ChildStdout>>) -> Result<String> {
    tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .context("the floor server said nothing within 60 s")??
        .context("the floor server exited (its error is above)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's side of the protocol, in process: a fan-out is only
    /// counted when every connection has answered.
    #[tokio::test]
    async fn a_ping_waits_for_every_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let n = 3;
        let (go_tx, go_rx) = watch::channel(0u64);
        let left = Arc::new(AtomicUsize::new(n));
        let done = Arc::new(Notify::new());
        let mut clients = Vec::new();
        for _ in 0..n {
            clients.push(
                TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connect"),
            );
        }
        for _ in 0..n {
            let (stream, _) = listener.accept().await.expect("accept");
            tokio::spawn(server_conn(
                stream,
                go_rx.clone(),
                left.clone(),
                done.clone(),
            ));
        }
        let finished = done.notified();
        go_tx.send_replace(1);
        let mut buf = [0u8; FRAME];
        // Two of three answer: not done.
        for c in clients.iter_mut().take(2) {
            c.read_exact(&mut buf).await.expect("ping");
            c.write_all(&buf).await.expect("answer");
        }
        tokio::pin!(finished);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut finished)
                .await
                .is_err(),
            "done before the third answer"
        );
        clients[2].read_exact(&mut buf).await.expect("ping");
        clients[2].write_all(&buf).await.expect("answer");
        tokio::time::timeout(Duration::from_secs(10), finished)
            .await
            .expect("done after every answer");
    }
}
