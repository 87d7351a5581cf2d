//! The relay as its users run it: the `alpn-xds serve` binary of this package, with a policy
//! folder, on free loopback ports. Killed when dropped; a test that panics while it runs gets
//! the end of its log on stderr.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::http::{HttpReply, get};
use super::{free_ports, loopback, wait_until};

/// How long the relay may take to answer `/healthz` and `/readyz`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Lines of the relay's log shown when a test fails.
const LOG_TAIL: usize = 150;

/// A running `alpn-xds serve`.
pub struct RelayProcess {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Runs `alpn-xds serve` in front of `upstream` (`http://…`) reading policies from
    /// `policy_dir`, and waits until its admin says it is healthy and ready.
    pub async fn start(upstream: &str, policy_dir: &Path) -> Self {
        Self::start_with(upstream, policy_dir, &["--plaintext"]).await
    }

    /// Like [`RelayProcess::start`], with `args` in place of `--plaintext`.
    pub async fn start_with(upstream: &str, policy_dir: &Path, args: &[&str]) -> Self {
        let [listen_port] = free_ports::<1>();
        Self::start_on(loopback(listen_port), upstream, policy_dir, args).await
    }

    /// Like [`RelayProcess::start_with`], listening for sidecars on `listen`: a relay restarted
    /// where its predecessor was.
    pub async fn start_on(
        listen: SocketAddr,
        upstream: &str,
        policy_dir: &Path,
        args: &[&str],
    ) -> Self {
        let source = [OsString::from("--policy-dir"), policy_dir.into()];
        Self::spawn(listen, upstream, &source, args).await
    }

    /// Runs `alpn-xds serve` (plaintext) in front of `upstream` reading policies from the
    /// Kubernetes API of `kubeconfig`, retrying that API at least every second, and waits
    /// until it is healthy and ready (its first complete list is done).
    pub async fn start_kube(upstream: &str, kubeconfig: &Path) -> Self {
        let source = [
            OsString::from("--kubeconfig"),
            kubeconfig.into(),
            "--kube-backoff-max=1s".into(),
            "--pod-watch-linger=1s".into(),
        ];
        let [listen_port] = free_ports::<1>();
        Self::spawn(loopback(listen_port), upstream, &source, &["--plaintext"]).await
    }

    /// Runs `alpn-xds serve` on `listen` with `source` choosing the policy source, then `args`.
    async fn spawn(listen: SocketAddr, upstream: &str, source: &[OsString], args: &[&str]) -> Self {
        let [admin_port] = free_ports::<1>();
        let admin = loopback(admin_port);
        let dir = tempfile::Builder::new()
            .prefix("alpn-xds-")
            .tempdir()
            .expect("tempdir");
        let log = std::fs::File::create(dir.path().join("relay.log")).expect("create log");

        let bin = env!("CARGO_BIN_EXE_alpn-xds");
        let child = Command::new(bin)
            .arg("serve")
            .args(["--listen", &listen.to_string()])
            .args(["--upstream", upstream])
            .args(source)
            .args(["--admin", &admin.to_string()])
            .args(args)
            .env("ALPN_XDS_LOG", "info,alpn_xds=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let mut relay = Self {
            child,
            listen,
            admin,
            dir,
        };

        for path in ["/healthz", "/readyz"] {
            wait_until(&format!("alpn-xds {path}"), START_TIMEOUT, || {
                if let Some(status) = relay.child.try_wait().ok().flatten() {
                    panic!("alpn-xds exited early with {status}; its log follows");
                }
                async move { get(admin, path).await.ok().filter(|r| r.status == 200) }
            })
            .await;
        }
        relay
    }

    /// Where sidecars connect.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The admin address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// `GET path` on the admin port; panics if the admin does not answer.
    pub async fn admin_get(&self, path: &str) -> HttpReply {
        get(self.admin, path)
            .await
            .unwrap_or_else(|e| panic!("alpn-xds admin {path}: {e}"))
    }

    /// `GET path` on the admin port, parsed as JSON.
    pub async fn admin_json(&self, path: &str) -> Value {
        let reply = self.admin_get(path).await;
        assert_eq!(reply.status, 200, "alpn-xds admin {path}: {}", reply.body);
        serde_json::from_str(&reply.body)
            .unwrap_or_else(|e| panic!("alpn-xds admin {path} is not JSON ({e}): {}", reply.body))
    }

    /// The process id, for reading `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<relay>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<relay>/status")
    }

    /// Kills the process with SIGKILL, as an OOM kill or a node loss would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM, as Kubernetes does before it stops a pod.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = &mut self.child;
        wait_until("alpn-xds to exit", timeout, || {
            let status = child.try_wait().expect("wait for alpn-xds");
            async move { status }
        })
        .await
    }

    /// The relay's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
            eprintln!("---- last {LOG_TAIL} lines of alpn-xds's log ----\n{tail}");
        }
    }
}
