//! The relay under test: the real `alpn-xds serve` binary in a process of its own, so that its
//! CPU time and memory are its own and can be read from `/proc`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the relay may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one admin request may take (`/debug/proxies` of 5,000 proxies is large).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `alpn-xds serve`, killed when dropped.
pub struct RelayProcess {
    child: Child,
    /// Where sidecars connect.
    pub listen: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    clock_ticks: f64,
}

impl RelayProcess {
    /// Runs `bin serve` in front of `upstream`, reading policies from `policy_dir`, logging to
    /// `log` at the default level, and waits until it is ready.
    pub async fn start(
        bin: &Path,
        upstream: &str,
        policy_dir: &Path,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let [listen, admin] = free_ports()?;
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        // For profiling: ALPN_XDS_BENCH_WRAPPER="perf record -g -o relay.perf --" runs the relay
        // under that command.
        let wrapper = std::env::var("ALPN_XDS_BENCH_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(words).arg(bin);
                command
            }
            None => Command::new(bin),
        };
        let child = command
            .arg("serve")
            .args(["--listen", &listen.to_string()])
            .args(["--upstream", upstream])
            .arg("--policy-dir")
            .arg(policy_dir)
            .args(["--admin", &admin.to_string()])
            // Loopback on both legs; the direct path has no TLS either, so the comparison holds.
            .arg("--plaintext")
            // Every simulated sidecar connects at once; pacing would measure the pacer.
            .args(["--upstream-connect-rate", "0"])
            .env_remove("ALPN_XDS_LOG")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        let mut relay = Self {
            child,
            listen,
            admin,
            log: log.to_path_buf(),
            clock_ticks: clock_ticks(),
        };

        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = relay.child.try_wait()? {
                bail!("alpn-xds exited with {status}; see {}", relay.log.display());
            }
            if matches!(relay.admin_get("/readyz").await, Ok((200, _))) {
                return Ok(relay);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("alpn-xds was not ready in {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// User plus system CPU time so far, in seconds (`/proc/<pid>/stat`; clock-tick resolution).
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let field = |i: usize| -> anyhow::Result<f64> {
            Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
        };
        // utime and stime are fields 14 and 15 of the line; 3 is the first after the name.
        Ok((field(11)? + field(12)?) / self.clock_ticks)
    }

    /// Resident memory now, in bytes (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS")?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .context("bad VmRSS")?
            .parse()?;
        Ok(kib * 1024)
    }

    /// `GET path` on the admin port: status and body.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        tokio::time::timeout(ADMIN_TIMEOUT, http_get(self.admin, path))
            .await
            .with_context(|| format!("admin {path} timed out"))?
    }

    /// `cached_listeners` and `connected` from `/debug/proxies`.
    pub async fn cache_and_connected(&self) -> anyhow::Result<(u64, u64)> {
        let (status, body) = self.admin_get("/debug/proxies").await?;
        if status != 200 {
            bail!("/debug/proxies answered {status}");
        }
        let json: serde_json::Value = serde_json::from_str(&body)?;
        let number = |key: &str| json.get(key).and_then(serde_json::Value::as_u64);
        Ok((
            number("cached_listeners").context("no cached_listeners")?,
            number("connected").context("no connected")?,
        ))
    }
}

impl Drop for RelayProcess {
    /// Stops the relay as Kubernetes would, with SIGTERM, so that a profiler wrapping it writes
    /// its data; kills it if it is still there after its drain time.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two loopback addresses whose ports were free a moment ago.
fn free_ports() -> anyhow::Result<[SocketAddr; 2]> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok([a.local_addr()?, b.local_addr()?])
}

/// Clock ticks per second, for `/proc` CPU times.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// An HTTP/1.0 GET, which the admin server answers and then closes.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok((status, body.to_string()))
}
