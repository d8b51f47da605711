//! A TCP proxy on 127.0.0.1 between one agent and the coordinator, that can
//! cut the link like a pulled cable: the network faults of issue 7 on
//! loopback processes, without Docker.
//!
//! The agent's `[coordinator] url` points at [`Proxy::url`]; the proxy
//! forwards each connection it accepts to the coordinator. [`Proxy::partition`]
//! makes it a blackhole: connections already open stay open, but nothing
//! more crosses them in either direction (bytes read, or an end of stream,
//! are held back), so only keepalive can tell either end that the link is
//! gone; and a new connection is closed as soon as it is accepted (no route,
//! as for a host taken off its network). [`Proxy::heal`] lets the held bytes
//! through and forwards again, as TCP would once the cable is back: an end
//! that gave up in the meantime then sees the other's data meet a closed
//! socket.
//!
//! The proxy runs on a runtime of its own (one worker thread), so it
//! forwards while the test's thread is blocked, e.g. in a CLI call; dropping
//! the proxy closes every socket it holds.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy to one upstream address; see the module docs.
#[derive(Debug)]
pub struct Proxy {
    rt: Option<tokio::runtime::Runtime>,
    port: u16,
    cut: watch::Sender<bool>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to
    /// `upstream`. Callable from sync or async code.
    pub fn start(upstream: SocketAddr) -> Result<Proxy> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("proxy")
            .enable_all()
            .build()
            .context("the proxy's runtime")?;
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("bind the proxy on 127.0.0.1")?;
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let listener = {
            let _in_rt = rt.enter();
            TcpListener::from_std(std_listener)?
        };
        let (cut, cut_rx) = watch::channel(false);
        rt.spawn(accept_loop(listener, upstream, cut_rx));
        Ok(Proxy {
            rt: Some(rt),
            port,
            cut,
        })
    }

    /// The port the agent connects to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:port`: the agent's `[coordinator] url`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts the link: nothing crosses open connections any more, new ones
    /// are closed at once.
    pub fn partition(&self) {
        self.cut.send_replace(true);
    }

    /// Restores the link: held bytes go through, new connections are
    /// forwarded again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Whether the link is cut.
    pub fn is_partitioned(&self) -> bool {
        *self.cut.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Allowed in async contexts too, unlike dropping the runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, cut: watch::Receiver<bool>) {
    loop {
        let Ok((down, _)) = listener.accept().await else {
            continue;
        };
        if *cut.borrow() {
            // No route while cut: the connection is closed at once.
            drop(down);
            continue;
        }
        let cut = cut.clone();
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let (down_r, down_w) = down.into_split();
            let (up_r, up_w) = up.into_split();
            tokio::join!(pump(down_r, up_w, cut.clone()), pump(up_r, down_w, cut));
        });
    }
}

/// Waits until the link is not cut; `false` when the proxy is gone.
async fn healed(cut: &mut watch::Receiver<bool>) -> bool {
    cut.wait_for(|c| !*c).await.is_ok()
}

/// Copies one direction of a connection, holding what it read (bytes or
/// the end of the stream) while the link is cut.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut cut: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !healed(&mut cut).await {
            return;
        }
        let n = from.read(&mut buf).await.unwrap_or(0);
        if !healed(&mut cut).await {
            return;
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn echo_server() -> Result<SocketAddr> {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Ok(addr)
    }

    async fn echo(s: &mut TcpStream, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(within, s.read_exact(&mut got))
            .await
            .ok()?
            .ok()?;
        Some(got)
    }

    #[tokio::test]
    async fn forwards_blackholes_while_cut_and_delivers_held_bytes_on_heal() -> Result<()> {
        let p = Proxy::start(echo_server().await?)?;
        let mut s = TcpStream::connect(("127.0.0.1", p.port())).await?;
        let within = Duration::from_secs(5);
        assert_eq!(
            echo(&mut s, b"one", within).await.as_deref(),
            Some(&b"one"[..])
        );
        p.partition();
        assert!(p.is_partitioned());
        // Silence on the open connection, which stays open.
        assert_eq!(echo(&mut s, b"two", Duration::from_millis(500)).await, None);
        // A new connection is closed at once.
        let mut fresh = TcpStream::connect(("127.0.0.1", p.port())).await?;
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(within, fresh.read(&mut b))
            .await
            .context("the new connection is not closed")?;
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        p.heal();
        // The held bytes arrive.
        let mut got = [0u8; 3];
        tokio::time::timeout(within, s.read_exact(&mut got)).await??;
        assert_eq!(&got, b"two");
        let mut again = TcpStream::connect(("127.0.0.1", p.port())).await?;
        assert_eq!(
            echo(&mut again, b"three", within).await.as_deref(),
            Some(&b"three"[..])
        );
        Ok(())
    }
}
