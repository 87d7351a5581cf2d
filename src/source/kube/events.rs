//! Kubernetes Events on PeerAuthentication objects whose ALPN annotation is ignored: a value
//! other than `true` or `false`, a policy in the root namespace or `istio-system`, or a policy
//! asking for the standard ALPNs where the mode is not PERMISSIVE; and on objects that cannot
//! be read at all.
//!
//! Events go to `events.k8s.io/v1`. Each is named after what it reports (the object's uid and
//! resourceVersion, the reason and the message), so reporting the same thing twice, after a
//! relist, a restart, or from another replica, meets `409 AlreadyExists` and adds nothing.
//! An Event appears again only when the object changes (a new resourceVersion) and the
//! problem is still there.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, Error as KubeError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::backoff::{Backoff, BackoffPolicy};
use super::state::{Entry, ObjectKey, ObjectVersion};
use crate::policy::{
    ALPN_ANNOTATION, ISTIO_SYSTEM_NAMESPACE, PolicyReportKind, PolicySet, Workload,
    parse_annotation_value,
};

/// `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "aspenmesh.io/alpn-xds";

/// The Event reasons.
pub mod reason {
    /// The annotation's value is neither `true` nor `false`.
    pub const BAD_ANNOTATION_VALUE: &str = "BadAnnotationValue";
    /// The annotation sits in the root namespace or `istio-system`.
    pub const ANNOTATION_IGNORED: &str = "AnnotationIgnored";
    /// The annotation asks for the standard ALPNs where the mode is STRICT or DISABLE.
    pub const MODE_NOT_PERMISSIVE: &str = "ModeNotPermissive";
    /// The object cannot be read as a PeerAuthentication.
    pub const INVALID_POLICY: &str = "InvalidPolicy";
}

/// The longest `note` the API server accepts, in bytes.
const MAX_NOTE: usize = 1024;

/// The longest object-name prefix of an Event name, leaving room for the digest.
const MAX_NAME_PREFIX: usize = 200;

/// Something worth one Event on one version of one object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Problem {
    /// The object version the Event is about.
    pub object: ObjectVersion,
    /// The Event's `reason`, one of [`reason`].
    pub reason: &'static str,
    /// The Event's `note`: the sentence the policy module wrote.
    pub note: String,
}

impl Problem {
    /// The Event's name: the object's name and a digest of what is reported, so that the same
    /// report always has the same name.
    pub fn event_name(&self) -> String {
        let mut hash = Fnv64::default();
        for part in [
            self.object.uid.as_str(),
            self.object.resource_version.as_str(),
            self.reason,
            self.note.as_str(),
        ] {
            hash.write(part.as_bytes());
            hash.write(&[0]);
        }
        let mut prefix = self.object.name.as_str();
        if prefix.len() > MAX_NAME_PREFIX {
            prefix = prefix[..MAX_NAME_PREFIX].trim_end_matches(['.', '-']);
        }
        format!("{prefix}.{:016x}", hash.0)
    }
}

/// The problems of the objects in `entries`, as indexed in `set`.
pub(super) fn problems(set: &PolicySet, entries: &BTreeMap<ObjectKey, Entry>) -> Vec<Problem> {
    let object_of = |namespace: &str, name: &str| {
        entries
            .get(&(namespace.to_string(), name.to_string()))
            .map(|e| e.object.clone())
    };
    let mut problems = Vec::new();

    for report in set.reports() {
        let reason = match report.kind {
            PolicyReportKind::BadAnnotationValue => reason::BAD_ANNOTATION_VALUE,
            PolicyReportKind::IgnoredPlacement => reason::ANNOTATION_IGNORED,
            _ => continue,
        };
        if let Some(object) = object_of(&report.policy.namespace, &report.policy.name) {
            problems.push(Problem {
                object,
                reason,
                note: report.message.clone(),
            });
        }
    }

    // A policy asking for the standard ALPNs is judged for the workloads it governs as far as
    // they are known without pods: a namespace policy for a workload no workload policy
    // selects, a workload policy for a workload with exactly its selector's labels.
    for policy in set.policies() {
        let asks = policy
            .annotation
            .as_deref()
            .and_then(parse_annotation_value)
            == Some(true);
        let placement_ignored =
            policy.namespace == set.root_namespace() || policy.namespace == ISTIO_SYSTEM_NAMESPACE;
        if !asks || placement_ignored {
            continue;
        }
        let Some(object) = object_of(&policy.namespace, &policy.name) else {
            continue;
        };
        let workload = Workload {
            namespace: policy.namespace.clone(),
            name: String::new(),
            labels: policy.selector.clone(),
        };
        let own = policy.policy_ref();
        for report in set.resolve(&workload).reports {
            if report.kind == PolicyReportKind::ModeNotPermissive && report.policy == own {
                problems.push(Problem {
                    object: object.clone(),
                    reason: reason::MODE_NOT_PERMISSIVE,
                    note: report.message,
                });
            }
        }
    }

    for entry in entries.values() {
        if let Some(error) = &entry.error {
            problems.push(Problem {
                object: entry.object.clone(),
                reason: reason::INVALID_POLICY,
                note: error.to_string(),
            });
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

/// Posts an Event for every new problem until every receiver of the problems is gone.
/// `instance` is this replica's name (`reportingInstance`).
pub(super) async fn record(
    client: Client,
    instance: String,
    mut problems: watch::Receiver<Arc<Vec<Problem>>>,
    backoff: BackoffPolicy,
) {
    let mut backoff = Backoff::new(backoff);
    // Problems reported (or logged, when reporting failed and waits for a retry).
    let mut seen: HashSet<Problem> = HashSet::new();
    let mut pending: Vec<Problem> = Vec::new();
    loop {
        let current = problems.borrow_and_update().clone();
        let live: HashSet<&Problem> = current.iter().collect();
        // Forget what is gone, so that it is reported again if it comes back.
        seen.retain(|p| live.contains(p));
        pending.retain(|p| live.contains(p));
        for problem in current.iter() {
            if seen.insert(problem.clone()) {
                warn!(
                    object = %format!("{}/{}", problem.object.namespace, problem.object.name),
                    reason = problem.reason,
                    "{}", problem.note
                );
                pending.push(problem.clone());
            }
        }

        let mut failed = Vec::new();
        for problem in pending.drain(..) {
            match post(&client, &instance, &problem).await {
                Ok(()) => backoff.reset(),
                Err(error) => {
                    warn!(
                        object = %format!("{}/{}", problem.object.namespace, problem.object.name),
                        reason = problem.reason,
                        %error,
                        "cannot post an Event; retrying"
                    );
                    failed.push(problem);
                }
            }
        }
        pending = failed;

        if pending.is_empty() {
            if problems.changed().await.is_err() {
                return;
            }
        } else {
            tokio::select! {
                changed = problems.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

/// Creates the Event of `problem`; one that already exists counts as created.
async fn post(client: &Client, instance: &str, problem: &Problem) -> Result<(), KubeError> {
    let name = problem.event_name();
    let events: Api<Event> = Api::namespaced(client.clone(), &problem.object.namespace);
    let event = Event {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(problem.object.namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        action: Some("ReadPolicy".to_string()),
        reason: Some(problem.reason.to_string()),
        note: Some(truncate(&problem.note, MAX_NOTE)),
        type_: Some("Warning".to_string()),
        reporting_controller: Some(REPORTING_CONTROLLER.to_string()),
        reporting_instance: Some(instance.to_string()),
        regarding: Some(ObjectReference {
            api_version: Some(problem.object.api_version.clone()),
            kind: Some("PeerAuthentication".to_string()),
            name: Some(problem.object.name.clone()),
            namespace: Some(problem.object.namespace.clone()),
            uid: Some(problem.object.uid.clone()),
            resource_version: Some(problem.object.resource_version.clone()),
            field_path: field_path(problem.reason),
        }),
        ..Event::default()
    };
    match events.create(&PostParams::default(), &event).await {
        Ok(_) => {
            info!(event = %name, reason = problem.reason, "Event posted");
            Ok(())
        }
        Err(KubeError::Api(status)) if status.is_already_exists() => {
            debug!(event = %name, "the Event exists already");
            Ok(())
        }
        Err(error) => Err(error),
    }
}

fn field_path(reason: &str) -> Option<String> {
    (reason != reason::INVALID_POLICY).then(|| format!("metadata.annotations['{ALPN_ANNOTATION}']"))
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// FNV-1a, 64 bits: stable across builds and processes, unlike the standard library's hasher,
/// so that every replica names the same Event the same way.
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PeerAuthentication;

    fn entry(policy: PeerAuthentication, resource_version: &str) -> (ObjectKey, Entry) {
        let object = ObjectVersion {
            api_version: "security.istio.io/v1".into(),
            namespace: policy.namespace.clone(),
            name: policy.name.clone(),
            uid: format!("uid-{}", policy.name),
            resource_version: resource_version.into(),
        };
        (
            (policy.namespace.clone(), policy.name.clone()),
            Entry {
                object,
                policy: Some(policy),
                error: None,
            },
        )
    }

    fn policy(namespace: &str, name: &str, annotation: &str, mode: &str) -> PeerAuthentication {
        let mut policy = PeerAuthentication::new(namespace, name, "test");
        policy.annotation = Some(annotation.into());
        policy.mode = crate::policy::MtlsMode::from_istio(mode).expect("mode");
        policy
    }

    fn problems_of(policies: Vec<PeerAuthentication>) -> Vec<(String, &'static str)> {
        let entries: BTreeMap<ObjectKey, Entry> =
            policies.iter().cloned().map(|p| entry(p, "7")).collect();
        let set = PolicySet::new(policies, "istio-system");
        problems(&set, &entries)
            .into_iter()
            .map(|p| (p.object.name, p.reason))
            .collect()
    }

    #[test]
    fn each_ignored_annotation_is_a_problem() {
        let found = problems_of(vec![
            policy("shop", "bad", "yes", "PERMISSIVE"),
            policy("istio-system", "mesh", "true", "PERMISSIVE"),
            policy("bank", "strict", "true", "STRICT"),
            policy("web", "fine", "true", "PERMISSIVE"),
            policy("off", "off", "false", "STRICT"),
        ]);
        assert_eq!(
            found,
            vec![
                ("strict".to_string(), reason::MODE_NOT_PERMISSIVE),
                ("mesh".to_string(), reason::ANNOTATION_IGNORED),
                ("bad".to_string(), reason::BAD_ANNOTATION_VALUE),
            ]
        );
    }

    #[test]
    fn an_inherited_strict_mode_counts_too() {
        let mut workload = policy("shop", "web", "true", "UNSET");
        workload.selector.insert("app".into(), "web".into());
        let found = problems_of(vec![workload, policy("shop", "default", "false", "STRICT")]);
        assert_eq!(
            found,
            vec![("web".to_string(), reason::MODE_NOT_PERMISSIVE)]
        );
    }

    #[test]
    fn event_names_are_stable_and_change_with_the_version() {
        let (_, a) = entry(policy("shop", "bad", "yes", "PERMISSIVE"), "7");
        let problem = Problem {
            object: a.object.clone(),
            reason: reason::BAD_ANNOTATION_VALUE,
            note: "n".into(),
        };
        let name = problem.event_name();
        assert_eq!(name, problem.clone().event_name());
        assert!(name.starts_with("bad."), "{name}");
        let mut edited = problem.clone();
        edited.object.resource_version = "8".into();
        assert_ne!(edited.event_name(), name);
    }

    #[test]
    fn notes_are_cut_at_a_character_boundary() {
        let long = "é".repeat(600);
        let cut = truncate(&long, MAX_NOTE);
        assert!(cut.len() <= MAX_NOTE && cut.ends_with("..."));
    }
}
