//! The Kubernetes source against a fake API server that speaks the real list and watch
//! protocol, through the same `kube` client the product builds from a kubeconfig: version
//! discovery, list then watch (ADDED, MODIFIED, DELETED, BOOKMARK), `410 Gone` as a watch
//! event and as an HTTP status, dropped connections, `500`s, the API server going away and
//! coming back, live pod labels, and Events that are not repeated.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use alpn_xds::metrics::Metrics;
use alpn_xds::policy::Workload;
use alpn_xds::relay::node::ProxyIdentity;
use alpn_xds::relay::workload_for;
use alpn_xds::source::PolicySnapshot;
use alpn_xds::source::SourceError;
use alpn_xds::source::kube::events::reason;
use alpn_xds::source::kube::{self, BackoffPolicy, KubeOptions, KubeSource, discovery};
use serde_json::{Value, json};
use support::fake_kube::{FakeKube, Match, SeenRequest};
use support::wait_until;

/// How long a change in the fake may take to reach a snapshot.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A source reading `fake`, retrying quickly.
struct Source {
    source: KubeSource,
    _dir: tempfile::TempDir,
}

impl Source {
    async fn start(fake: &FakeKube) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let client = kube::client(Some(&fake.write_kubeconfig(dir.path())))
            .await
            .expect("a client from the kubeconfig");
        let mut options = KubeOptions::new("istio-system", "replica-1");
        options.backoff = BackoffPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
        };
        options.pod_linger = Duration::from_millis(300);
        Self {
            source: KubeSource::start(client, &options, Arc::new(Metrics::new())),
            _dir: dir,
        }
    }

    fn now(&self) -> Arc<PolicySnapshot> {
        self.source.policies.borrow().clone()
    }

    /// Waits for a snapshot that `check` accepts.
    async fn wait(
        &self,
        what: &str,
        check: impl Fn(&PolicySnapshot) -> bool,
    ) -> Arc<PolicySnapshot> {
        let mut policies = self.source.policies.clone();
        let found = tokio::time::timeout(CHANGE_TIMEOUT, policies.wait_for(|s| check(s))).await;
        match found {
            Ok(Ok(snapshot)) => snapshot.clone(),
            _ => panic!(
                "timed out waiting for {what}; last snapshot: {:?}",
                self.now()
            ),
        }
    }

    async fn synced(&self) -> Arc<PolicySnapshot> {
        self.wait("the first complete list", |s| s.synced).await
    }
}

/// A PeerAuthentication object; `selector` as `key=value`.
fn policy(
    namespace: &str,
    name: &str,
    annotation: Option<&str>,
    mode: &str,
    selector: Option<&str>,
) -> Value {
    let mut object = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"mtls": {"mode": mode}},
    });
    if let Some(value) = annotation {
        object["metadata"]["annotations"] = json!({"http-alpns.aspenmesh.io": value});
    }
    if let Some((key, value)) = selector.and_then(|s| s.split_once('=')) {
        object["spec"]["selector"] = json!({"matchLabels": {key: value}});
    }
    object
}

/// The annotation of `namespace/name` in `snapshot`: `None` when the policy is absent,
/// `Some(None)` when it has no annotation.
fn annotation(snapshot: &PolicySnapshot, namespace: &str, name: &str) -> Option<Option<String>> {
    snapshot
        .set
        .policies()
        .find(|p| p.namespace == namespace && p.name == name)
        .map(|p| p.annotation.clone())
}

fn has(snapshot: &PolicySnapshot, namespace: &str, name: &str) -> bool {
    annotation(snapshot, namespace, name).is_some()
}

fn lists_of(fake: &FakeKube, resource: &str) -> Vec<SeenRequest> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(resource) && !r.is_watch())
        .collect()
}

fn watches_of(fake: &FakeKube, resource: &str) -> Vec<SeenRequest> {
    fake.requests()
        .into_iter()
        .filter(|r| r.path.ends_with(resource) && r.is_watch())
        .collect()
}

const PA: &str = "peerauthentications";

/// Waits until `count` watches are open on the fake.
async fn watching(fake: &FakeKube, count: usize) {
    wait_until(&format!("{count} open watches"), CHANGE_TIMEOUT, || async {
        (fake.open_watches() == count).then_some(())
    })
    .await;
}

#[tokio::test]
async fn discovery_prefers_v1_and_falls_back_to_v1beta1() {
    for (versions, expected, other) in [
        (&["v1", "v1beta1"][..], "v1", "v1beta1"),
        (&["v1beta1"][..], "v1beta1", "v1"),
    ] {
        let fake = FakeKube::start(versions).await;
        fake.apply_policy(policy("shop", "default", Some("true"), "PERMISSIVE", None));
        let source = Source::start(&fake).await;
        let snapshot = source.synced().await;

        assert!(has(&snapshot, "shop", "default"));
        let api_version = format!("security.istio.io/{expected}");
        assert!(
            snapshot.origin.contains(&api_version),
            "{}",
            snapshot.origin
        );
        let lists = lists_of(&fake, PA);
        assert!(
            lists
                .iter()
                .all(|r| r.path == format!("/apis/{api_version}/{PA}")),
            "lists went to {:?}",
            lists.iter().map(|r| &r.path).collect::<Vec<_>>()
        );
        let wrong = format!("/apis/security.istio.io/{other}/{PA}");
        assert!(!fake.requests().iter().any(|r| r.path == wrong));
        // The kubeconfig's credentials are what the client sends.
        assert!(lists.iter().all(|r| r.authorization == "Bearer fake-token"));
    }
}

#[tokio::test]
async fn without_istio_the_source_is_never_ready() {
    let fake = FakeKube::start(&[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = kube::client(Some(&fake.write_kubeconfig(dir.path())))
        .await
        .expect("client");
    let error = discovery::peer_authentication(&client)
        .await
        .expect_err("no security.istio.io group");
    assert!(matches!(error, SourceError::NotServed { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("peerauthentications.security.istio.io"),
        "{error}"
    );

    let source = Source::start(&fake).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!source.now().synced, "ready without ever listing");
    // It kept asking, with a backoff rather than a tight loop.
    let asked = fake.requests().iter().filter(|r| r.path == "/apis").count();
    assert!((2..40).contains(&asked), "/apis asked {asked} times");
}

#[tokio::test]
async fn a_version_no_longer_served_is_discovered_again() {
    let fake = FakeKube::start(&["v1beta1"]).await;
    fake.apply_policy(policy("shop", "default", Some("true"), "PERMISSIVE", None));
    let source = Source::start(&fake).await;
    let first = source.synced().await;
    assert!(
        first.origin.contains("security.istio.io/v1beta1"),
        "{}",
        first.origin
    );

    // Istio is upgraded: only v1 is served now, and the v1beta1 watch breaks.
    fake.serve_versions(&["v1"]);
    watching(&fake, 1).await;
    fake.drop_watches();
    fake.apply_policy(policy("bank", "default", None, "STRICT", None));
    let snapshot = source
        .wait("the policies through v1", |s| {
            s.origin.contains("security.istio.io/v1 ") && has(s, "bank", "default")
        })
        .await;
    assert!(has(&snapshot, "shop", "default") && snapshot.synced);
    let v1_lists = format!("/apis/security.istio.io/v1/{PA}");
    assert!(lists_of(&fake, PA).iter().any(|r| r.path == v1_lists));
}

#[tokio::test]
async fn policies_follow_adds_edits_and_deletes() {
    let fake = FakeKube::start(&["v1", "v1beta1"]).await;
    let listed_at = fake.apply_policy(policy("shop", "default", Some("true"), "PERMISSIVE", None));
    // The first two lists fail: not ready until one succeeds.
    fake.fail_next(
        Match {
            path: PA.into(),
            watch: Some(false),
        },
        500,
        2,
    );
    let source = Source::start(&fake).await;
    assert!(!source.now().synced);
    let snapshot = source.synced().await;
    assert_eq!(snapshot.generation, 1);
    assert_eq!(
        annotation(&snapshot, "shop", "default"),
        Some(Some("true".to_string()))
    );
    assert_eq!(
        lists_of(&fake, PA).len(),
        3,
        "two failed lists, then one that worked"
    );

    // The watch starts at the list's resourceVersion and asks for bookmarks.
    let first_watch = wait_until("the watch request", CHANGE_TIMEOUT, || async {
        watches_of(&fake, PA).into_iter().next()
    })
    .await;
    assert_eq!(
        first_watch.query.get("resourceVersion"),
        Some(&listed_at.to_string())
    );
    assert_eq!(
        first_watch
            .query
            .get("allowWatchBookmarks")
            .map(String::as_str),
        Some("true")
    );

    // ADDED, MODIFIED, DELETED.
    fake.apply_policy(policy("bank", "default", None, "STRICT", None));
    source
        .wait("bank/default added", |s| has(s, "bank", "default"))
        .await;
    fake.apply_policy(policy("shop", "default", Some("false"), "PERMISSIVE", None));
    source
        .wait("shop/default edited", |s| {
            annotation(s, "shop", "default") == Some(Some("false".into()))
        })
        .await;
    fake.delete_policy("bank", "default");
    let snapshot = source
        .wait("bank/default deleted", |s| !has(s, "bank", "default"))
        .await;
    assert_eq!(snapshot.generation, 4, "one snapshot per change");
    assert_eq!(
        lists_of(&fake, PA).len(),
        3,
        "no relist while the watch is healthy"
    );
}

#[tokio::test]
async fn a_broken_watch_resumes_from_the_last_bookmark_without_relisting() {
    let fake = FakeKube::start(&["v1"]).await;
    fake.apply_policy(policy("shop", "default", Some("true"), "PERMISSIVE", None));
    let source = Source::start(&fake).await;
    source.synced().await;

    // A change elsewhere moves the store's resourceVersion; the policy watch hears of it only
    // through bookmarks.
    let elsewhere = fake.apply_pod("other", "p", &[("app", "p")]);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // The connection breaks mid-stream; a policy changes before the watch is back.
    watching(&fake, 1).await;
    fake.drop_watches();
    fake.apply_policy(policy("bank", "default", Some("true"), "PERMISSIVE", None));
    source
        .wait("bank/default after the break", |s| {
            has(s, "bank", "default")
        })
        .await;
    assert_eq!(lists_of(&fake, PA).len(), 1, "resumed, not relisted");
    let resumed = watches_of(&fake, PA);
    assert!(resumed.len() >= 2, "{resumed:?}");
    let from: u64 = resumed[1].query["resourceVersion"]
        .parse()
        .expect("a number");
    assert!(
        from >= elsewhere,
        "resumed from {from}, before the bookmark's {elsewhere}"
    );

    // Two watch requests fail with 500; the source retries and catches up.
    fake.fail_next(
        Match {
            path: PA.into(),
            watch: Some(true),
        },
        500,
        2,
    );
    watching(&fake, 1).await;
    fake.drop_watches();
    fake.apply_policy(policy("bank", "default", Some("false"), "PERMISSIVE", None));
    source
        .wait("bank/default edited after two 500s", |s| {
            annotation(s, "bank", "default") == Some(Some("false".into()))
        })
        .await;
    assert!(source.now().synced);
}

#[tokio::test]
async fn gone_relists_and_keeps_the_policies_meanwhile() {
    let fake = FakeKube::start(&["v1"]).await;
    fake.apply_policy(policy("shop", "default", Some("true"), "PERMISSIVE", None));
    let source = Source::start(&fake).await;
    let first = source.synced().await;

    // A 410 ERROR event in the middle of the watch: relist.
    watching(&fake, 1).await;
    fake.expire_watches();
    fake.apply_policy(policy("bank", "default", None, "PERMISSIVE", None));
    assert!(
        has(&source.now(), "shop", "default"),
        "policies kept while relisting"
    );
    let snapshot = source
        .wait("bank/default after 410", |s| has(s, "bank", "default"))
        .await;
    assert!(has(&snapshot, "shop", "default"));
    assert!(snapshot.generation > first.generation);
    assert_eq!(lists_of(&fake, PA).len(), 2);

    // A 410 as the HTTP status of the watch request: relist too, not retry the same version.
    fake.fail_next(
        Match {
            path: PA.into(),
            watch: Some(true),
        },
        410,
        1,
    );
    watching(&fake, 1).await;
    fake.drop_watches();
    fake.apply_policy(policy("web", "default", None, "PERMISSIVE", None));
    source
        .wait("web/default after HTTP 410", |s| has(s, "web", "default"))
        .await;
    wait_until("the relist after HTTP 410", CHANGE_TIMEOUT, || async {
        (lists_of(&fake, PA).len() == 3).then_some(())
    })
    .await;

    // A 410 on the list itself: retried after the backoff.
    fake.fail_next(
        Match {
            path: PA.into(),
            watch: Some(false),
        },
        410,
        1,
    );
    watching(&fake, 1).await;
    fake.expire_watches();
    fake.delete_policy("web", "default");
    source
        .wait("web/default deleted", |s| !has(s, "web", "default"))
        .await;
    assert_eq!(
        lists_of(&fake, PA).len(),
        5,
        "a failed list, then one that worked"
    );
    assert!(has(&source.now(), "shop", "default") && has(&source.now(), "bank", "default"));
}

#[tokio::test]
async fn the_api_server_going_away_and_coming_back_loses_nothing() {
    let fake = FakeKube::start(&["v1"]).await;
    fake.apply_policy(policy("shop", "default", Some("true"), "PERMISSIVE", None));
    fake.apply_policy(policy("bank", "default", Some("true"), "PERMISSIVE", None));
    let source = Source::start(&fake).await;
    let before = source.synced().await;

    // Away: changes pile up in the store; the source keeps what it knew.
    fake.stop().await;
    fake.apply_policy(policy("shop", "default", Some("false"), "PERMISSIVE", None));
    fake.delete_policy("bank", "default");
    fake.apply_policy(policy("web", "default", None, "STRICT", None));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let during = source.now();
    assert!(during.synced, "still ready while the API server is away");
    assert_eq!(during.generation, before.generation);
    assert_eq!(
        annotation(&during, "shop", "default"),
        Some(Some("true".into()))
    );

    // Back: the watch resumes and replays everything missed.
    fake.restart().await;
    let after = source
        .wait("every change made while away", |s| {
            annotation(s, "shop", "default") == Some(Some("false".into()))
                && !has(s, "bank", "default")
                && has(s, "web", "default")
        })
        .await;
    assert!(after.synced);

    // Away again, and the history is compacted meanwhile: only a relist can catch up.
    let lists = lists_of(&fake, PA).len();
    fake.stop().await;
    fake.apply_policy(policy("bank", "default", Some("true"), "PERMISSIVE", None));
    fake.compact();
    fake.restart().await;
    source
        .wait("bank/default after a compacted outage", |s| {
            has(s, "bank", "default")
        })
        .await;
    assert!(lists_of(&fake, PA).len() > lists, "relisted");
}

/// The identity of a proxy of pod `shop/web-1` whose node metadata says `app=web`.
fn web_1() -> ProxyIdentity {
    ProxyIdentity {
        node_id: "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local".into(),
        workload: Some(Workload {
            namespace: "shop".into(),
            name: "web-1".into(),
            labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        }),
        workload_from: "metadata",
        istio_version: None,
    }
}

/// Whether the relay would add the standard ALPNs for `identity` under `snapshot`.
fn adds_alpns(identity: &ProxyIdentity, snapshot: &PolicySnapshot) -> bool {
    let workload = workload_for(identity, snapshot).expect("a workload");
    snapshot.set.resolve(&workload).adds_standard_alpns(None)
}

#[tokio::test]
async fn a_relabelled_pod_changes_its_decision() {
    let fake = FakeKube::start(&["v1"]).await;
    fake.apply_policy(policy("shop", "default", Some("true"), "PERMISSIVE", None));
    fake.apply_policy(policy(
        "shop",
        "locked",
        Some("false"),
        "PERMISSIVE",
        Some("tier=locked"),
    ));
    fake.apply_pod("shop", "web-1", &[("app", "web")]);
    fake.apply_pod("shop", "web-2", &[("app", "web")]);
    fake.apply_pod("other", "x", &[("app", "x")]);
    let source = Source::start(&fake).await;
    source.synced().await;
    let tracker = source.source.tracker().expect("pod labels are followed");
    let proxy = web_1();

    let guard = tracker.track("shop", "web-1");
    let snapshot = source
        .wait("web-1's labels", |s| {
            s.pods.contains_key(&("shop".into(), "web-1".into()))
        })
        .await;
    assert!(adds_alpns(&proxy, &snapshot));
    assert_eq!(snapshot.pods.len(), 1, "only tracked pods are published");

    // Relabelled into the locked tier: the workload policy saying "false" now selects it.
    fake.apply_pod("shop", "web-1", &[("app", "web"), ("tier", "locked")]);
    let snapshot = source
        .wait("web-1 relabelled", |s| {
            s.pods
                .get(&("shop".into(), "web-1".into()))
                .is_some_and(|l| l.get("tier").map(String::as_str) == Some("locked"))
        })
        .await;
    assert!(
        !adds_alpns(&proxy, &snapshot),
        "the relabelled pod still gets the ALPNs"
    );

    // A second proxy in the same namespace shares the watch.
    let second = tracker.track("shop", "web-2");
    source
        .wait("web-2's labels", |s| {
            s.pods.contains_key(&("shop".into(), "web-2".into()))
        })
        .await;

    // Only what is needed was read: one metadata-only list and watch of namespace shop.
    let pod_requests: Vec<SeenRequest> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("pods"))
        .collect();
    assert!(
        pod_requests
            .iter()
            .all(|r| r.path == "/api/v1/namespaces/shop/pods"
                && r.accept.contains("as=PartialObjectMetadata")),
        "{pod_requests:?}"
    );
    assert_eq!(lists_of(&fake, "pods").len(), 1);

    // A deleted pod cannot be read: the node metadata's labels decide again.
    fake.delete_pod("shop", "web-1");
    let snapshot = source
        .wait("web-1 gone", |s| {
            !s.pods.contains_key(&("shop".into(), "web-1".into()))
        })
        .await;
    assert!(
        adds_alpns(&proxy, &snapshot),
        "fallback to the node metadata's labels"
    );

    // The last proxy of the namespace leaves: the pod watch stops after the linger.
    drop(guard);
    drop(second);
    source.wait("no tracked pods", |s| s.pods.is_empty()).await;
    wait_until("the pod watch to stop", CHANGE_TIMEOUT, || async {
        (fake.open_watches() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_pod_that_cannot_be_read_falls_back_to_the_node_metadata() {
    let fake = FakeKube::start(&["v1"]).await;
    fake.apply_policy(policy("shop", "default", Some("true"), "PERMISSIVE", None));
    fake.apply_policy(policy(
        "shop",
        "locked",
        Some("false"),
        "PERMISSIVE",
        Some("tier=locked"),
    ));
    fake.apply_pod("shop", "web-1", &[("app", "web"), ("tier", "locked")]);
    fake.fail_next(
        Match {
            path: "/namespaces/shop/pods".into(),
            watch: None,
        },
        403,
        usize::MAX,
    );
    let source = Source::start(&fake).await;
    source.synced().await;
    let tracker = source.source.tracker().expect("pod labels are followed");
    let _guard = tracker.track("shop", "web-1");

    wait_until("attempts to list the pods", CHANGE_TIMEOUT, || async {
        (lists_of(&fake, "pods").len() >= 2).then_some(())
    })
    .await;
    let snapshot = source.now();
    assert!(snapshot.pods.is_empty());
    assert!(
        adds_alpns(&web_1(), &snapshot),
        "judged by the node metadata's app=web"
    );
}

/// The `reason` of each Event, with the name of the object it is about, sorted.
fn event_reasons(fake: &FakeKube) -> Vec<(String, String)> {
    let mut reasons: Vec<(String, String)> = fake
        .events()
        .iter()
        .map(|e| {
            (
                e["regarding"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    reasons.sort();
    reasons
}

#[tokio::test]
async fn events_are_posted_once_per_object_version() {
    let fake = FakeKube::start(&["v1"]).await;
    fake.apply_policy(policy("shop", "bad", Some("yes"), "PERMISSIVE", None));
    fake.apply_policy(policy(
        "istio-system",
        "mesh",
        Some("true"),
        "PERMISSIVE",
        None,
    ));
    fake.apply_policy(policy("bank", "strict", Some("true"), "STRICT", None));
    fake.apply_policy(policy("web", "fine", Some("true"), "PERMISSIVE", None));
    let source = Source::start(&fake).await;
    source.synced().await;

    let expected = vec![
        ("bad".to_string(), reason::BAD_ANNOTATION_VALUE.to_string()),
        ("mesh".to_string(), reason::ANNOTATION_IGNORED.to_string()),
        (
            "strict".to_string(),
            reason::MODE_NOT_PERMISSIVE.to_string(),
        ),
    ];
    wait_until("three Events", CHANGE_TIMEOUT, || async {
        (event_reasons(&fake) == expected).then_some(())
    })
    .await;
    for event in fake.events() {
        let regarding = &event["regarding"];
        let uid = regarding["uid"].as_str().expect("uid");
        assert!(uid.starts_with("uid-"), "{event}");
        assert_eq!(regarding["kind"], "PeerAuthentication");
        assert_eq!(regarding["apiVersion"], "security.istio.io/v1");
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reportingInstance"], "replica-1");
        assert_eq!(event["metadata"]["namespace"], regarding["namespace"]);
        let note = event["note"].as_str().expect("note");
        assert!(
            note.contains(regarding["name"].as_str().expect("name")),
            "{note}"
        );
    }

    // A relist and a second replica report nothing new.
    watching(&fake, 1).await;
    fake.expire_watches();
    wait_until("the relist", CHANGE_TIMEOUT, || async {
        (lists_of(&fake, PA).len() == 2).then_some(())
    })
    .await;
    let replica = Source::start(&fake).await;
    replica.synced().await;
    let posts = || {
        fake.requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
            .count()
    };
    wait_until("the second replica's attempts", CHANGE_TIMEOUT, || async {
        (posts() >= 6).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(event_reasons(&fake), expected, "an Event was repeated");
    assert_eq!(posts(), 6, "each replica posts each problem once");

    // An edit that keeps the bad value is a new version: one new Event. A fix adds none.
    let mut edited = policy("shop", "bad", Some("YES"), "PERMISSIVE", None);
    edited["metadata"]["labels"] = json!({"team": "shop"});
    fake.apply_policy(edited);
    wait_until("the Event on the new version", CHANGE_TIMEOUT, || async {
        (fake.events().len() == 4).then_some(())
    })
    .await;
    fake.apply_policy(policy("shop", "bad", Some("true"), "PERMISSIVE", None));
    source
        .wait("the fix", |s| {
            annotation(s, "shop", "bad") == Some(Some("true".into()))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.events().len(), 4);
}
